//! Registers on JetStream: each is the one message of its subject in the `<NS>_REGISTERS`
//! stream (one message per subject, kept on disk), its revision the message's stream sequence,
//! and a write a publish that expects the subject's last sequence.

use super::delivery::publish_expecting_with;
use crate::error::{Error, Result};
use crate::protocol::Names;
use async_nats::jetstream::{self, stream};

/// The registers' stream, declared if missing.
async fn registers(js: &jetstream::Context, names: &Names) -> Result<stream::Stream> {
    js.get_or_create_stream(stream::Config {
        name: names.stream("registers"),
        subjects: vec![format!("{}.registers.>", names.namespace())],
        retention: stream::RetentionPolicy::Limits,
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| Error::broker("declare stream", e))
}

fn subject(names: &Names, name: &str) -> Result<String> {
    crate::schedule::validate_register(name)?;
    Ok(format!("{}.registers.{name}", names.namespace()))
}

pub(super) async fn read(
    js: &jetstream::Context,
    names: &Names,
    name: &str,
) -> Result<Option<(u64, bytes::Bytes)>> {
    let subject = subject(names, name)?;
    let stream = registers(js, names).await?;
    match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => Ok(Some((m.sequence, m.payload))),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(Error::broker("read register", e)),
    }
}

pub(super) async fn write(
    js: &jetstream::Context,
    names: &Names,
    name: &str,
    expected: u64,
    value: bytes::Bytes,
) -> Result<Option<u64>> {
    let subject = subject(names, name)?;
    registers(js, names).await?;
    publish_expecting_with(js, &subject, expected, value).await
}

//! A worker with a kind of its own, next to the built-in ones.
//!
//! Run it against the local NATS (or pass an amqp:// URL), then publish with
//! `conveyor-producer publish greet --payload '{"name":"Ada"}' --wait`.

use conveyor::worker::{self, builtin, handler_fn, JobContext, WorkerConfig};
use conveyor::{BrokerUrl, JobError};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Greet {
    name: String,
}

#[derive(Serialize)]
struct Greeting {
    text: String,
    attempt: u32,
}

async fn greet(input: Greet, ctx: JobContext) -> Result<Greeting, JobError> {
    if input.name.is_empty() {
        return Err(JobError::permanent("name must not be empty"));
    }
    Ok(Greeting {
        text: format!("hello, {}", input.name),
        attempt: ctx.meta.attempt,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = BrokerUrl::parse(
        &std::env::args()
            .nth(1)
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
    )?;
    let mut registry = builtin::registry();
    registry.register("greet", handler_fn(greet));
    let transport = conveyor::transport::connect(&url, "conveyor").await?;
    let (shutdown, force) = conveyor::shutdown::on_signals();
    worker::run(
        transport,
        registry,
        WorkerConfig::default(),
        shutdown,
        force,
    )
    .await?;
    Ok(())
}

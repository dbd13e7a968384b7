//! The brokers of a test's own (a nats-server, a RabbitMQ node), behind one face, for tests that
//! kill, restart or stop them.

use super::own_nats::OwnNats;
use super::own_rabbit::OwnRabbit;

/// A broker process of the test's own that can be killed and started again on the same port and
/// store.
pub trait OwnBroker {
    fn url(&self) -> String;
    fn addr(&self) -> String;
    fn start(&mut self);
    fn kill9(&mut self);
    /// SIGSTOP (`true`) or SIGCONT the broker: a zombie that holds its connections and answers
    /// nothing.
    fn pause(&self, on: bool);
}

impl OwnBroker for OwnNats {
    fn url(&self) -> String {
        OwnNats::url(self)
    }
    fn addr(&self) -> String {
        OwnNats::addr(self)
    }
    fn start(&mut self) {
        OwnNats::start(self)
    }
    fn kill9(&mut self) {
        OwnNats::kill9(self)
    }
    fn pause(&self, on: bool) {
        OwnNats::pause(self, on)
    }
}

impl OwnBroker for OwnRabbit {
    fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr())
    }
    fn addr(&self) -> String {
        OwnRabbit::addr(self)
    }
    fn start(&mut self) {
        OwnRabbit::start(self)
    }
    fn kill9(&mut self) {
        OwnRabbit::kill9(self)
    }
    fn pause(&self, on: bool) {
        OwnRabbit::pause(self, on)
    }
}

//! A RabbitMQ vhost per test on the machine's broker, so tests run in parallel without seeing
//! each other's exchanges, queues or messages.
//!
//! `AMQP_ADDR` says where the broker is and as whom to connect (default guest on localhost);
//! `RABBITMQCTL` is the command that administers it (default `rabbitmqctl`; with a broker in a
//! container, e.g. `docker exec <container> rabbitmqctl`).

use std::process::Command;

fn amqp_addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// `amqp://user:pass@host:port`, the part of `AMQP_ADDR` before the vhost.
fn broker_base() -> String {
    let addr = amqp_addr();
    let authority_start = addr.find("://").map_or(0, |i| i + 3);
    match addr[authority_start..].find('/') {
        Some(slash) => addr[..authority_start + slash].to_owned(),
        None => addr,
    }
}

/// `host:port` of the broker in `AMQP_ADDR`.
pub fn broker_address() -> String {
    let base = broker_base();
    let authority = base.split_once("://").map_or(base.as_str(), |(_, rest)| rest);
    let address = authority.rsplit_once('@').map_or(authority, |(_, address)| address);
    if address.contains(':') { address.to_owned() } else { format!("{address}:5672") }
}

/// The user tests connect as, who gets permissions on each test vhost.
fn broker_user() -> String {
    let addr = amqp_addr();
    let authority = addr.split_once("://").map_or(addr.as_str(), |(_, rest)| rest);
    match authority.split_once('@') {
        Some((credentials, _)) => credentials.split(':').next().unwrap_or("guest").to_owned(),
        None => "guest".to_owned(),
    }
}

fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let command = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let mut words = command.split_whitespace();
    let program = words.next().unwrap_or("rabbitmqctl");
    let output = Command::new(program).args(words).arg("-q").args(args).output().map_err(|e| {
        format!("cannot run {command} ({e}); is RabbitMQ installed here? (RABBITMQCTL names the command)")
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("rabbitmqctl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// A vhost of its own with full permissions for the `AMQP_ADDR` user, deleted on drop.
#[derive(Debug)]
pub struct TestVhost {
    name: String,
    url: String,
}

impl TestVhost {
    /// Creates the vhost. Panics, saying what to start, when the broker is not running.
    pub fn create() -> Self {
        let name = crate::unique_name("tracehop-test");
        rabbitmqctl(&["add_vhost", &name]).unwrap_or_else(|e| panic!("{e}: the tests need RabbitMQ running"));
        rabbitmqctl(&["set_permissions", "-p", &name, &broker_user(), ".*", ".*", ".*"])
            .unwrap_or_else(|e| panic!("{e}"));
        let url = format!("{}/{name}", broker_base());
        Self { name, url }
    }

    /// The vhost's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The AMQP URI of this vhost.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sets the `AMQP_ADDR` user's permissions here: regular expressions of the resources it may
    /// configure, write and read (`^$` for none).
    pub fn set_permissions(&self, configure: &str, write: &str, read: &str) {
        rabbitmqctl(&["set_permissions", "-p", &self.name, &broker_user(), configure, write, read])
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["delete_vhost", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

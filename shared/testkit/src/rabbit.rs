//! A RabbitMQ vhost per test on the machine's broker, so tests run in parallel without seeing
//! each other's exchanges, queues or messages.

use std::process::Command;

/// Where the shared broker is: `AMQP_ADDR`'s host part, else the local default.
fn broker_base() -> String {
    let addr = std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    match addr.rsplit_once('/') {
        Some((base, _)) if base.contains("://") && base.len() > "amqp://".len() => base.to_owned(),
        _ => addr,
    }
}

fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let output = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl ({e}); is RabbitMQ installed here?"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("rabbitmqctl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// A vhost of its own with full permissions for `guest`, deleted on drop.
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
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]).unwrap_or_else(|e| panic!("{e}"));
        let url = format!("{}/{name}", broker_base());
        Self { name, url }
    }

    /// The AMQP URI of this vhost.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["delete_vhost", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

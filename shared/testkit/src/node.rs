//! Throw-away RabbitMQ nodes for destructive tests: their own node name, ports, data and log
//! directories, started from the installed `rabbitmq-server`, so killing or restarting them
//! never touches the machine's shared broker (README, "Testing").

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// One throw-away node; stopped and deleted on drop.
#[derive(Debug)]
pub struct ThrowawayNode {
    name: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
}

fn run(command: &mut Command) -> Result<String, String> {
    let output = command.output().map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl ThrowawayNode {
    /// Starts a node named `<prefix>-<random>@localhost` on free ports and waits until it
    /// accepts connections. Panics, saying what is missing, where `rabbitmq-server` is not
    /// installed.
    pub fn start(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name(&format!("tracehop-node-{prefix}")));
        std::fs::create_dir_all(&dir).expect("node directory");
        let [port, dist_port] = crate::free_ports();
        let node = Self { name: format!("{}@localhost", crate::unique_name(prefix)), port, dist_port, dir };
        // The machine's /etc/rabbitmq/rabbitmq.conf pins the listener to 5672: use our own.
        let config = format!("listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n", node.port);
        std::fs::write(node.dir.join("rabbitmq.conf"), config).expect("config");
        std::fs::write(node.dir.join("enabled_plugins"), "[].\n").expect("plugins");
        std::fs::write(node.dir.join("rabbitmq-env.conf"), "").expect("env file");
        // Started as root, the node runs as the rabbitmq user: it must own its directory.
        let _ = Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(&node.dir).status();
        node.launch();
        node
    }

    fn launch(&self) {
        let dir = self.dir.display().to_string();
        let mut command = Command::new("rabbitmq-server");
        command
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", format!("{dir}/rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", format!("{dir}/rabbitmq-env.conf"))
            .env("RABBITMQ_MNESIA_BASE", format!("{dir}/mnesia"))
            .env("RABBITMQ_LOG_BASE", format!("{dir}/log"))
            .env("RABBITMQ_PID_FILE", format!("{dir}/pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", format!("{dir}/enabled_plugins"));
        run(&mut command).unwrap_or_else(|e| {
            panic!("{e}\nthe destructive tests need an installed rabbitmq-server (run them as root)")
        });
        self.await_startup(Duration::from_secs(60));
    }

    fn await_startup(&self, timeout: Duration) {
        let started = Instant::now();
        loop {
            let ready =
                run(Command::new("rabbitmqctl").args(["-n", &self.name, "-q", "await_startup", "--timeout", "5"]));
            if ready.is_ok() {
                return;
            }
            if started.elapsed() > timeout {
                panic!(
                    "node {} did not start within {timeout:?}: {ready:?}; logs in {}",
                    self.name,
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The node name, e.g. `restart-1a2b@localhost`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl -n <node> <args>`.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        run(Command::new("rabbitmqctl").args(["-n", &self.name, "-q"]).args(args))
    }

    /// Stops the node cleanly (waits until it is down).
    pub fn stop(&self) {
        if let Err(e) = self.ctl(&["stop"]) {
            eprintln!("warning: stopping {}: {e}", self.name);
        }
    }

    /// Kills the node's Erlang VM with SIGKILL.
    pub fn kill(&self) {
        let pid = std::fs::read_to_string(self.dir.join("pid")).unwrap_or_default();
        let pid = pid.trim();
        assert!(!pid.is_empty(), "no pid file for {}", self.name);
        let _ = run(Command::new("kill").args(["-9", pid]));
        // Wait until the port is free, so a restart does not race the dying VM.
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the node again on its data directory (after [`stop`](Self::stop) or
    /// [`kill`](Self::kill)).
    pub fn restart(&self) {
        self.launch();
    }
}

impl Drop for ThrowawayNode {
    fn drop(&mut self) {
        if self.ctl(&["stop"]).is_err()
            && let Ok(pid) = std::fs::read_to_string(self.dir.join("pid"))
        {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster of throw-away nodes: started together, joined to the first.
#[derive(Debug)]
pub struct ThrowawayCluster {
    /// The nodes; the first is the one the others joined.
    pub nodes: Vec<ThrowawayNode>,
}

impl ThrowawayCluster {
    /// Starts `size` nodes at once and clusters them (all run as the `rabbitmq` user, so they
    /// share its Erlang cookie).
    pub fn start(prefix: &str, size: usize) -> Self {
        let nodes: Vec<ThrowawayNode> = std::thread::scope(|scope| {
            let starting: Vec<_> = (0..size).map(|_| scope.spawn(|| ThrowawayNode::start(prefix))).collect();
            starting.into_iter().map(|node| node.join().expect("node start")).collect()
        });
        let first = nodes[0].name().to_owned();
        for node in &nodes[1..] {
            for step in [vec!["stop_app"], vec!["join_cluster", first.as_str()], vec!["start_app"]] {
                node.ctl(&step).unwrap_or_else(|e| panic!("clustering {}: {e}", node.name()));
            }
        }
        let cluster = Self { nodes };
        let status = cluster.nodes[0].ctl(&["cluster_status"]).unwrap_or_default();
        assert!(cluster.nodes.iter().all(|n| status.contains(n.name())), "not clustered: {status}");
        cluster
    }

    /// `AMQP_ADDR` for the whole cluster: every node's URI, comma-separated.
    pub fn amqp_addr(&self) -> String {
        self.nodes.iter().map(ThrowawayNode::amqp_url).collect::<Vec<_>>().join(",")
    }

    /// What a live node lists for `queue` (a quorum queue) on the default vhost: name, leader,
    /// members, members online, messages; `None` when no node answers or the queue is missing.
    fn queue_row(&self, queue: &str) -> Option<String> {
        let live = self.nodes.iter().find(|n| n.ctl(&["status"]).is_ok())?;
        let listing =
            live.ctl(&["list_queues", "name", "leader", "members", "online", "messages", "--no-table-headers"]).ok()?;
        listing.lines().find(|line| line.split_whitespace().next() == Some(queue)).map(str::to_owned)
    }

    /// `queue`'s leader, members and members online, one line, for a failure message.
    pub fn describe_queue(&self, queue: &str) -> String {
        self.queue_row(queue).unwrap_or_else(|| "no node answers, or the queue is not declared".to_owned())
    }

    /// The node that leads `queue` (a quorum queue) on the default vhost.
    pub fn leader_of(&self, queue: &str) -> Option<&ThrowawayNode> {
        let row = self.queue_row(queue)?;
        let leader = row.split_whitespace().nth(1)?;
        self.nodes.iter().find(|n| n.name() == leader)
    }
}

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
    /// Starts a node named `<prefix>_<random>@localhost` on free ports and waits until it
    /// accepts connections. A node that does not come up is tried again, twice, on new ports;
    /// the panic after the third names every attempt with the tail of its log. Panics, saying
    /// what is missing, where `rabbitmq-server` is not installed.
    pub fn start(prefix: &str) -> Self {
        let mut attempts = Vec::new();
        for _ in 0..3 {
            let node = Self::prepare(prefix);
            match node.launch() {
                Ok(()) => return node,
                // Dropping the node stops whatever is left of it and deletes its directory.
                Err(failure) => attempts.push(failure),
            }
        }
        panic!("no throw-away node started in three attempts:\n{}", attempts.join("\n"))
    }

    /// A new node's name, ports, directory and configuration, not yet started.
    fn prepare(prefix: &str) -> Self {
        let name = crate::unique_name(prefix);
        let dir = std::env::temp_dir().join(format!("tracehop-node-{name}"));
        std::fs::create_dir_all(&dir).expect("node directory");
        let [port, dist_port] = crate::free_ports();
        let node = Self { name: format!("{name}@localhost"), port, dist_port, dir };
        // The machine's /etc/rabbitmq/rabbitmq.conf pins the listener to 5672: use our own.
        let config = format!("listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n", node.port);
        std::fs::write(node.dir.join("rabbitmq.conf"), config).expect("config");
        std::fs::write(node.dir.join("enabled_plugins"), "[].\n").expect("plugins");
        std::fs::write(node.dir.join("rabbitmq-env.conf"), "").expect("env file");
        // Started as root, the node runs as the rabbitmq user: it must own its directory.
        let _ = Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(&node.dir).status();
        node
    }

    fn launch(&self) -> Result<(), String> {
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
        self.await_startup(Duration::from_secs(60), Duration::from_secs(15)).map_err(|failure| {
            format!(
                "node {} (AMQP port {}, distribution port {}) {failure}\n{}",
                self.name,
                self.port,
                self.dist_port,
                self.log_tail(20)
            )
        })
    }

    /// Waits until the node has booted. Gives up after `timeout`, or once no VM of this name has
    /// been running for `gone_for`: a VM that dies at boot (its distribution port taken, say)
    /// writes no log and would otherwise be waited on for the whole timeout.
    fn await_startup(&self, timeout: Duration, gone_for: Duration) -> Result<(), String> {
        let started = Instant::now();
        let mut absent_since: Option<Instant> = None;
        loop {
            let ready = self.ctl(&["await_startup", "--timeout", "5"]);
            let Err(error) = ready else { return Ok(()) };
            if self.vm_pids().is_empty() {
                let since = *absent_since.get_or_insert_with(Instant::now);
                if since.elapsed() > gone_for {
                    return Err(format!("has not been running for {gone_for:?} (its VM exited): {error}"));
                }
            } else {
                absent_since = None;
            }
            if started.elapsed() > timeout {
                return Err(format!("did not start within {timeout:?}: {error}"));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The last `lines` lines of each of the node's log files, or why there are none.
    fn log_tail(&self, lines: usize) -> String {
        let logs: Vec<PathBuf> = std::fs::read_dir(self.dir.join("log"))
            .map(|entries| entries.flatten().map(|entry| entry.path()).filter(|path| path.is_file()).collect())
            .unwrap_or_default();
        if logs.is_empty() {
            return "no log written: the VM stopped before RabbitMQ booted".to_owned();
        }
        logs.iter()
            .map(|path| {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..].join("\n");
                format!("--- {}:\n{tail}", path.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The node name, e.g. `restart_<32 hex digits>@localhost`.
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
        self.launch().unwrap_or_else(|failure| panic!("restarting: {failure}"));
    }

    /// The pids of this node's Erlang VM, found by the node name in its environment: a VM still
    /// booting has not written its pid file yet.
    fn vm_pids(&self) -> Vec<String> {
        let wanted = format!("RABBITMQ_NODENAME={}\0", self.name);
        let Ok(processes) = std::fs::read_dir("/proc") else { return Vec::new() };
        processes
            .flatten()
            .filter(|process| {
                let path = process.path();
                std::fs::read_to_string(path.join("comm")).is_ok_and(|comm| comm.trim() == "beam.smp")
                    && std::fs::read(path.join("environ"))
                        .is_ok_and(|environ| environ.windows(wanted.len()).any(|w| w == wanted.as_bytes()))
            })
            .map(|process| process.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for ThrowawayNode {
    fn drop(&mut self) {
        if self.ctl(&["stop"]).is_err() {
            for pid in self.vm_pids() {
                let _ = Command::new("kill").args(["-9", &pid]).status();
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_whose_distribution_port_is_taken_is_reported_as_exited_without_a_log() {
        let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("a port to take");
        let mut node = ThrowawayNode::prepare("taken");
        node.dist_port = taken.local_addr().expect("bound").port();

        let failure = node.launch().expect_err("a node whose distribution port is taken cannot start");

        assert!(failure.contains("its VM exited"), "{failure}");
        assert!(failure.contains("no log written"), "{failure}");
        assert!(failure.contains(&format!("distribution port {}", node.dist_port)), "{failure}");
        assert_eq!(node.vm_pids(), Vec::<String>::new(), "no VM is left behind");
    }

    #[test]
    fn a_nodes_vm_is_found_by_its_name_for_the_drop_to_kill_it() {
        let node = ThrowawayNode::start("pids");
        let pid = std::fs::read_to_string(node.dir.join("pid")).expect("the pid file of a started node");

        assert_eq!(node.vm_pids(), vec![pid.trim().to_owned()]);
    }
}

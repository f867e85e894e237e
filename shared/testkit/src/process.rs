//! The services as real child processes, for what only a process can show: SIGKILL mid-load,
//! SIGTERM and the exit code, resident memory.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The path of a workspace binary (`gateway`, `checkout`, `stock`), built beside the tests.
pub fn binary(name: &str) -> PathBuf {
    // target/<profile>/deps/<test binary> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --bins; scripts/test does)",
        path.display()
    );
    path
}

/// A running service process whose output lines are kept.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// The threads reading its stdout and stderr: joined once it has exited, so that its last
    /// lines (the error it exits with) are in `lines` before a caller looks.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl ServiceProcess {
    /// Starts binary `name` with exactly `env` (plus `PATH`), logging JSON lines.
    pub fn start(name: &str, env: &[(&str, String)]) -> Self {
        let mut command = Command::new(binary(name));
        command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("LOG_FORMAT", "json");
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap_or_else(PoisonError::into_inner).push(line);
                }
            }));
        }
        Self { name: name.to_owned(), child, lines, readers }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Output lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// How many output lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner).iter().filter(|l| l.contains(needle)).count()
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill").args([signal, &self.child.id().to_string()]).status();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
        self.read_to_the_end();
    }

    /// Waits for the process to exit, up to `timeout`: its status and how long it took.
    pub fn wait(&mut self, timeout: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                let took = started.elapsed();
                self.read_to_the_end();
                return Some((status, took));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Waits until its output is read to the end (the process has exited: its pipes close).
    fn read_to_the_end(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// Resident set size in KiB (`VmRSS`), peak (`VmHWM`) in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU seconds used so far (user + system), from `/proc/<pid>/stat`.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may contain spaces) start after ") ".
        let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
        ticks as f64 / 100.0
    }

    /// Name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

//! `loadgen free-ports`, as the scripts read it: one line of distinct ports, separated by
//! spaces, outside the kernel's ephemeral range.

use std::collections::HashSet;
use std::process::Command;

#[test]
fn free_ports_prints_distinct_ports_outside_the_ephemeral_range_on_one_line() {
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen")).args(["free-ports", "4"]).output().expect("run loadgen");
    assert!(output.status.success(), "loadgen free-ports failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).expect("UTF-8");

    let line = stdout.strip_suffix('\n').expect("a line ending in a newline");
    assert!(!line.contains('\n'), "more than one line: {stdout:?}");
    let ports: Vec<u16> = line.split(' ').map(|port| port.parse().expect("a port")).collect();
    assert_eq!(ports.len(), 4, "{line:?}");
    assert_eq!(ports.iter().collect::<HashSet<_>>().len(), 4, "a port twice in {ports:?}");
    let band = tracehop_ports::outside_the_ephemeral_range().expect("room outside the ephemeral range");
    for port in &ports {
        assert!(band.contains(port), "{port} not in {band:?}");
    }
}

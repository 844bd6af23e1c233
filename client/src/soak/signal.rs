//! The server's process: SIGTERM sent to it, and whether it still runs.

/// Whether process `pid` is still running: neither gone nor a zombie (the state field
/// of `/proc/PID/stat` follows the parenthesised command name).
pub(super) fn running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

pub(super) fn send_sigterm(pid: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_or_missing_process_is_not_running() {
        assert!(running(std::process::id() as i32));
        assert!(!running(i32::MAX));
    }
}

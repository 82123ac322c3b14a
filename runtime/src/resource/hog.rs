//! A CPU hog: a busy shell loop in a child process, the "other load" that
//! the governor must make room for in tests and `stoker bench governor`.

use std::process::{Child, Command, Stdio};

use super::ResourceError;

/// One busy core until dropped (the child is killed and reaped on drop).
#[derive(Debug)]
pub struct CpuHog {
    child: Child,
}

impl CpuHog {
    /// Starts `sh -c 'while :; do :; done'`.
    ///
    /// # Errors
    /// `sh` cannot be started.
    pub fn start() -> Result<Self, ResourceError> {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| ResourceError::Hog(format!("cannot start sh: {e}")))?;
        Ok(CpuHog { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            tracing::warn!(pid = self.child.id(), error = %e, "cannot kill the cpu hog");
        }
        let _ = self.child.wait();
    }
}

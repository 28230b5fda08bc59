//! A small filesystem of the test's own for disk-full tests: a tmpfs of a chosen size mounted on
//! a fresh temporary directory, filled to the last page and freed again on demand, unmounted when
//! dropped. Mounting needs root (CI runs as root); elsewhere [`SmallDisk::mount`] says why it
//! cannot, and the test prints that and skips.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs. Stop every process with files on it before dropping it.
pub struct SmallDisk {
    dir: tempfile::TempDir,
    filler: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it: `16m`) on a new temporary
    /// directory. `Err` says why it cannot (not root, no `mount`, no tmpfs).
    pub fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let filler = dir.path().join("filler");
        Ok(Self { dir, filler })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Takes every free byte with a filler file, until writing fails with "no space left".
    pub fn fill(&self) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)
            .expect("filler file");
        let chunk = vec![0xa5u8; 64 * 1024];
        for size in [chunk.len(), 4096, 1] {
            loop {
                match file.write(&chunk[..size]) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                    Err(e) => panic!("filling {}: {e}", self.filler.display()),
                }
            }
        }
        let _ = file.sync_all();
    }

    /// After [`SmallDisk::fill`]: frees `bytes` again, so writes run out of space part way.
    pub fn leave_free(&self, bytes: u64) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.filler)
            .expect("filler file");
        let len = file.metadata().expect("filler size").len();
        file.set_len(len.saturating_sub(bytes))
            .expect("shrink the filler");
    }

    /// Removes the filler: the space is back.
    pub fn free(&self) {
        std::fs::remove_file(&self.filler).expect("remove the filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds a file there; detach it so the directory can go.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

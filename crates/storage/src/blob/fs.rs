//! Objects as files in a directory: `<root>/<tenant>/<first two of name>/<name>`, written
//! to `<root>/tmp/` first and renamed into place, so a crash leaves either nothing or the
//! whole file (both are on one file system, where a rename is atomic).

use super::ObjectStore;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct FsObjects {
    root: PathBuf,
}

/// Ids and hashes are ours (hex and dashes); anything else must not reach a path.
fn safe_segment(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect()
}

impl FsObjects {
    /// Objects under `root` (the data directory's `files/`).
    pub fn new(root: impl Into<PathBuf>) -> FsObjects {
        FsObjects { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where work in progress lies: uploads being received, files being sealed, decrypted
    /// copies for OCR. Not a tenant's; left out of backups.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn tenant_dir(&self, tenant: &str) -> PathBuf {
        self.root.join(safe_segment(tenant))
    }

    /// The file of an object.
    pub fn path(&self, tenant: &str, name: &str) -> PathBuf {
        let h = safe_segment(name);
        self.tenant_dir(tenant)
            .join(h.get(..2).unwrap_or("00"))
            .join(h)
    }
}

/// Makes a directory entry durable (a rename or a removal) by syncing its directory.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl ObjectStore for FsObjects {
    fn put(&self, tenant: &str, name: &str, body: &mut dyn Read) -> io::Result<u64> {
        let dest = self.path(tenant, name);
        let tmp_dir = self.tmp_dir();
        std::fs::create_dir_all(&tmp_dir)?;
        // Created 0600 and removed when dropped, whatever happens before the rename.
        let tmp = tempfile::Builder::new()
            .prefix("seal-")
            .tempfile_in(&tmp_dir)?;
        let mut w = io::BufWriter::with_capacity(1 << 16, tmp);
        let n = io::copy(body, &mut w)?;
        w.flush()?;
        let tmp = w.into_inner().map_err(|e| e.into_error())?;
        tmp.as_file().sync_all()?;
        let parent = dest
            .parent()
            .ok_or_else(|| io::Error::other("object path without a directory"))?;
        std::fs::create_dir_all(parent)?;
        tmp.persist(&dest).map_err(|e| e.error)?;
        sync_dir(parent);
        Ok(n)
    }

    fn get(&self, tenant: &str, name: &str) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(std::fs::File::open(self.path(tenant, name))?))
    }

    fn exists(&self, tenant: &str, name: &str) -> io::Result<bool> {
        self.path(tenant, name).try_exists()
    }

    fn delete(&self, tenant: &str, name: &str) -> io::Result<()> {
        let p = self.path(tenant, name);
        match std::fs::remove_file(&p) {
            Ok(()) => {
                if let Some(parent) = p.parent() {
                    sync_dir(parent);
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn delete_tenant(&self, tenant: &str) -> io::Result<()> {
        let dir = self.tenant_dir(tenant);
        if dir == self.root || safe_segment(tenant).is_empty() {
            return Err(io::Error::other("no tenant to delete"));
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn list(&self, tenant: &str) -> io::Result<Vec<String>> {
        let dir = self.tenant_dir(tenant);
        let mut out = Vec::new();
        let shards = match std::fs::read_dir(&dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for shard in shards {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(shard.path())? {
                let f = f?;
                if f.file_type()?.is_file() {
                    if let Some(name) = f.file_name().to_str() {
                        out.push(name.to_string());
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

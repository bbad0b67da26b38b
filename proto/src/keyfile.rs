//! The key file: an identity's 64 secret bytes on disk, mode 0600.
//!
//! The one module of this crate that touches the filesystem (no sockets,
//! no clock): both `rendezvous` and `p2pd` keep their identity this way.
//! A new file is written to a temporary name, synced and renamed, so a
//! crash never leaves a half-written key behind.

use crate::identity::Identity;
use std::fs;
use std::io::Write;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is damaged: {detail}")]
    Damaged { path: String, detail: String },
    #[error("key file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")]
    TooOpen { path: String, mode: u32 },
}

/// Loads the identity at `path`, or makes one and saves it there if the
/// file does not exist. Returns the identity and whether it was created.
pub fn load_or_create_identity(path: &Path) -> Result<(Identity, bool), KeyFileError> {
    let shown = path.display().to_string();
    match fs::read(path) {
        Ok(bytes) => {
            check_mode(path)?;
            let id = Identity::from_secret_bytes(&bytes).map_err(|e| KeyFileError::Damaged {
                path: shown,
                detail: e.to_string(),
            })?;
            Ok((id, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = Identity::generate();
            save(path, &id).map_err(|source| KeyFileError::Write {
                path: shown,
                source,
            })?;
            Ok((id, true))
        }
        Err(source) => Err(KeyFileError::Read {
            path: shown,
            source,
        }),
    }
}

#[cfg(unix)]
fn check_mode(path: &Path) -> Result<(), KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|source| KeyFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::TooOpen {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_: &Path) -> Result<(), KeyFileError> {
    Ok(())
}

fn save(path: &Path, id: &Identity) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&tmp)?;
    f.write_all(&id.to_secret_bytes().0)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("keyfile-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn created_once_then_loaded_with_mode_0600() {
        let d = temp_dir("create");
        let p = d.join("sub").join("identity.key");
        let (a, created) = load_or_create_identity(&p).unwrap();
        assert!(created);
        let (b, created) = load_or_create_identity(&p).unwrap();
        assert!(!created);
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_damaged_or_open_file_is_refused_and_kept() {
        let d = temp_dir("bad");
        fs::create_dir_all(&d).unwrap();
        let p = d.join("identity.key");
        fs::write(&p, b"short").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(matches!(
            load_or_create_identity(&p),
            Err(KeyFileError::Damaged { .. })
        ));
        // Never overwritten: the user's bytes are still there.
        assert_eq!(fs::read(&p).unwrap(), b"short");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                load_or_create_identity(&p),
                Err(KeyFileError::TooOpen { .. })
            ));
        }
        fs::remove_dir_all(&d).unwrap();
    }
}

//! Default locations, shared by `p2pd` and `p2pctl` so both find the same
//! control socket without configuration.

use std::path::{Path, PathBuf};

/// The daemon's data directory: identity key and database.
/// `~/.local/share/p2p-chat/p2pd` on Linux,
/// `~/Library/Application Support/p2p-chat/p2pd` on macOS.
pub fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "p2p-chat")
        .map(|d| d.data_dir().join("p2pd"))
        .unwrap_or_else(|| PathBuf::from(".p2pd"))
}

/// The control socket: in the runtime directory (`$XDG_RUNTIME_DIR`)
/// where there is one, which is private to the user and cleared at
/// logout; in the data directory otherwise (macOS).
pub fn default_socket() -> PathBuf {
    directories::ProjectDirs::from("", "", "p2p-chat")
        .and_then(|d| d.runtime_dir().map(|r| r.join("p2pd.sock")))
        .unwrap_or_else(|| default_data_dir().join("p2pd.sock"))
}

/// Where accepted files go by default: the user's downloads directory, or
/// `~/Downloads`, or `downloads` in the data directory.
pub fn default_downloads() -> PathBuf {
    directories::UserDirs::new()
        .and_then(|u| {
            u.download_dir()
                .map(Path::to_path_buf)
                .or_else(|| Some(u.home_dir().join("Downloads")))
        })
        .unwrap_or_else(|| default_data_dir().join("downloads"))
}

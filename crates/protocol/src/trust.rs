//! Who may talk to the daemon and who is trusted: the peer's credentials
//! from `SO_PEERCRED`, matched against `allowed-users` and `trusted-users`
//! as Nix matches them (user names, `@group`, `*`).

use std::os::fd::AsRawFd;

/// The credentials of the process at the other end of a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

/// Reads `SO_PEERCRED` of a connected Unix socket.
pub fn peer_cred(socket: &impl AsRawFd) -> std::io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: (cred.pid > 0).then_some(cred.pid),
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// A user as the access lists see it: a name (if the uid has one) and the
/// names of its groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub uid: u32,
    pub name: Option<String>,
    pub groups: Vec<String>,
}

impl UserInfo {
    /// Looks the uid up in the system's user and group databases.
    pub fn lookup(uid: u32, gid: u32) -> UserInfo {
        use nix::unistd::{Gid, Group, Uid, User};
        let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
        let mut gids = vec![Gid::from_raw(gid)];
        if let Some(u) = &user {
            if let Ok(name) = std::ffi::CString::new(u.name.clone()) {
                if let Ok(list) = nix::unistd::getgrouplist(&name, u.gid) {
                    gids.extend(list);
                }
            }
        }
        let mut groups: Vec<String> = gids
            .into_iter()
            .filter_map(|g| Group::from_gid(g).ok().flatten().map(|g| g.name))
            .collect();
        groups.sort();
        groups.dedup();
        UserInfo {
            uid,
            name: user.map(|u| u.name),
            groups,
        }
    }

    /// Whether the user is in `list` (names, `@group`, `*`), as Nix's
    /// `matchUser`.
    pub fn matches(&self, list: &[String]) -> bool {
        list.iter().any(|entry| {
            if entry == "*" {
                true
            } else if let Some(group) = entry.strip_prefix('@') {
                self.groups.iter().any(|g| g == group)
            } else {
                self.name.as_deref() == Some(entry.as_str())
            }
        })
    }
}

/// The access lists of a daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// `trusted-users` (default `root`).
    pub trusted_users: Vec<String>,
    /// `allowed-users` (default `*`).
    pub allowed_users: Vec<String>,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            trusted_users: vec!["root".into()],
            allowed_users: vec!["*".into()],
        }
    }
}

/// What a connecting user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Trusted,
    Untrusted,
    Refused,
}

impl Access {
    /// Sets the lists from a `nix.conf`-style setting; other names are
    /// not ours.
    pub fn set(&mut self, name: &str, value: &str) -> bool {
        let words = || value.split_whitespace().map(str::to_owned).collect();
        match name {
            "trusted-users" => self.trusted_users = words(),
            "allowed-users" => self.allowed_users = words(),
            _ => return false,
        }
        true
    }

    /// Trusted users are always allowed, as in Nix.
    pub fn admit(&self, user: &UserInfo) -> Admission {
        if user.matches(&self.trusted_users) {
            Admission::Trusted
        } else if user.matches(&self.allowed_users) {
            Admission::Untrusted
        } else {
            Admission::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            uid: 1000,
            name: Some(name.into()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn matches_names_groups_and_star() {
        let access = Access {
            trusted_users: vec!["root".into(), "@wheel".into()],
            allowed_users: vec!["alice".into(), "@builders".into()],
        };
        assert_eq!(access.admit(&user("root", &[])), Admission::Trusted);
        assert_eq!(access.admit(&user("bob", &["wheel"])), Admission::Trusted);
        assert_eq!(access.admit(&user("alice", &[])), Admission::Untrusted);
        assert_eq!(
            access.admit(&user("carol", &["builders"])),
            Admission::Untrusted
        );
        assert_eq!(
            access.admit(&user("mallory", &["users"])),
            Admission::Refused
        );
        assert_eq!(
            Access::default().admit(&user("anyone", &[])),
            Admission::Untrusted
        );
    }

    #[test]
    fn reads_own_socket_credentials() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        assert_eq!(cred.uid, nix::unistd::getuid().as_raw());
        assert_eq!(cred.pid, Some(std::process::id() as i32));
    }
}

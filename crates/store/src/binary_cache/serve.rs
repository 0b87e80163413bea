//! `kiln store serve-cache`: any [`Store`] served over HTTP as a binary
//! cache that Nix can substitute from (`nix copy --from http://…`).
//!
//! Narinfos are made from the store's metadata on each request and signed
//! then with the server's key; NARs are served uncompressed and streamed
//! from the store as they are produced, never held whole in memory. The
//! NAR file name carries the NAR hash, so a narinfo and the NAR it names
//! always agree even if the path is repaired in between.

use std::io::{self, Cursor, Read};
use std::net::SocketAddr;
use std::sync::Arc;

use kiln_formats::narinfo::{CacheInfo, NarInfo};
use kiln_formats::signature::SecretKey;
use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

use super::{BinaryCacheError, pipe, plain_nar_file};
use crate::{PathInfo, Store};

/// How a store is served.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Signs every narinfo served.
    pub secret_key: Option<SecretKey>,
    /// The `Priority` in `nix-cache-info` (cache.nixos.org says 40).
    pub priority: i32,
    /// Requests handled at once.
    pub threads: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            secret_key: None,
            priority: 30,
            threads: 8,
        }
    }
}

/// A listening binary-cache server.
pub struct CacheServer {
    server: Arc<Server>,
    addr: SocketAddr,
}

impl std::fmt::Debug for CacheServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl CacheServer {
    /// Listens on `addr` (`127.0.0.1:0` picks a free port).
    pub fn bind(addr: &str) -> Result<CacheServer, BinaryCacheError> {
        let server = Server::http(addr).map_err(|e| BinaryCacheError::Transport {
            cache: format!("http://{addr}"),
            url: format!("http://{addr}"),
            message: format!("cannot listen: {e}"),
        })?;
        let addr = server
            .server_addr()
            .to_ip()
            .expect("an HTTP server listens on an IP address");
        Ok(CacheServer {
            server: Arc::new(server),
            addr,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `store` until [`stop`](Self::stop) is called (from another
    /// thread, via [`stopper`](Self::stopper)).
    pub fn serve(&self, store: Arc<dyn Store>, options: &ServeOptions) {
        std::thread::scope(|scope| {
            for _ in 0..options.threads.max(1) {
                let store = Arc::clone(&store);
                let server = &self.server;
                scope.spawn(move || {
                    while let Ok(request) = server.recv() {
                        handle(request, &store, options);
                    }
                });
            }
        });
    }

    /// A handle that stops [`serve`](Self::serve).
    pub fn stopper(&self) -> Stopper {
        Stopper(Arc::clone(&self.server), self.addr)
    }
}

/// Stops a [`CacheServer`].
#[derive(Clone)]
pub struct Stopper(Arc<Server>, SocketAddr);

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stopper({})", self.1)
    }
}

impl Stopper {
    pub fn stop(&self) {
        // One wake-up per worker is more than enough: unblock makes every
        // pending and future `recv` return.
        for _ in 0..64 {
            self.0.unblock();
        }
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header")
}

fn text(status: u16, content_type: &str, body: String) -> Response<Cursor<Vec<u8>>> {
    Response::from_data(body.into_bytes())
        .with_status_code(StatusCode(status))
        .with_header(header("Content-Type", content_type))
}

fn handle(request: Request, store: &Arc<dyn Store>, options: &ServeOptions) {
    let method = request.method().clone();
    let url = request.url().split('?').next().unwrap_or("").to_owned();
    let _span = tracing::debug_span!("serve", %method, %url).entered();
    if method != Method::Get && method != Method::Head {
        let _ = request.respond(text(405, "text/plain", "only GET and HEAD\n".into()));
        return;
    }
    let result = match url.trim_start_matches('/') {
        "nix-cache-info" => {
            let info = CacheInfo {
                want_mass_query: Some(true),
                priority: Some(options.priority),
                ..CacheInfo::for_store(store.store_dir())
            };
            request.respond(text(200, "text/x-nix-cache-info", info.to_text()))
        }
        name if name.ends_with(".narinfo") && !name.contains('/') => {
            let hash_part = name.trim_end_matches(".narinfo");
            match lookup(store, hash_part) {
                Ok(Some(info)) => match narinfo_text(store, &info, options) {
                    Ok(body) => request.respond(text(200, "text/x-nix-narinfo", body)),
                    Err(e) => request.respond(text(500, "text/plain", format!("{e}\n"))),
                },
                Ok(None) => request.respond(text(404, "text/plain", "no such path\n".into())),
                Err(e) => request.respond(text(500, "text/plain", format!("{e}\n"))),
            }
        }
        name if name.starts_with("nar/") && name.ends_with(".nar") => {
            let hash_part = name[4..].split('-').next().unwrap_or("");
            match lookup(store, hash_part) {
                Ok(Some(info)) if name == plain_nar_file(&info) => {
                    let length = usize::try_from(info.nar_size).ok();
                    let headers = vec![header("Content-Type", "application/x-nix-nar")];
                    if method == Method::Head {
                        request.respond(Response::new(
                            StatusCode(200),
                            headers,
                            io::empty(),
                            length,
                            None,
                        ))
                    } else {
                        let body = stream_nar(Arc::clone(store), info);
                        request.respond(Response::new(StatusCode(200), headers, body, length, None))
                    }
                }
                Ok(_) => request.respond(text(404, "text/plain", "no such NAR\n".into())),
                Err(e) => request.respond(text(500, "text/plain", format!("{e}\n"))),
            }
        }
        _ => request.respond(text(404, "text/plain", "not found\n".into())),
    };
    if let Err(e) = result {
        tracing::debug!("client went away: {e}");
    }
}

fn lookup(store: &Arc<dyn Store>, hash_part: &str) -> Result<Option<PathInfo>, crate::StoreError> {
    if hash_part.len() != 32 {
        return Ok(None);
    }
    match store.query_path_from_hash_part(hash_part)? {
        Some(path) => store.query_path_info(&path),
        None => Ok(None),
    }
}

fn narinfo_text(
    store: &Arc<dyn Store>,
    info: &PathInfo,
    options: &ServeOptions,
) -> Result<String, kiln_formats::signature::SignatureError> {
    let mut narinfo = NarInfo {
        store_path: info.path.clone(),
        url: plain_nar_file(info),
        compression: "none".to_owned(),
        file_hash: Some(info.nar_hash),
        file_size: Some(info.nar_size),
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: info.references.clone(),
        deriver: info.deriver.clone(),
        system: None,
        signatures: info.sigs.iter().filter_map(|s| s.parse().ok()).collect(),
        ca: info.ca.clone(),
    };
    if let Some(key) = &options.secret_key {
        narinfo.sign(store.store_dir(), key)?;
    }
    Ok(narinfo.to_text(store.store_dir()))
}

/// The NAR of `info`, produced by another thread as it is read.
fn stream_nar(store: Arc<dyn Store>, info: PathInfo) -> impl Read + Send + 'static {
    let (mut writer, reader) = pipe::pipe();
    std::thread::spawn(move || {
        if let Err(e) = store.nar_from_path(&info.path, &mut writer) {
            // The response fails and the connection closes: the client
            // sees a download cut short, never a complete-looking one.
            tracing::warn!("serving the NAR of {}: {e}", info.path);
            writer.fail(e.to_string());
        }
    });
    reader
}

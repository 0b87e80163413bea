//! Who may change things through the web listener. Reading (GET, HEAD,
//! OPTIONS) is open to all; any other method (adding or changing a
//! specification, triggering an evaluation, restarting a build) needs
//! `Authorization: Bearer <token>` when a token is configured. Without a
//! token, writes are open, which [`check_listen`] allows on loopback
//! addresses only.
//!
//! The token is compared in constant time: both sides are hashed with
//! SHA-256 first, so neither the contents nor the length of the secret
//! leak through the time a refusal takes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::AppState;
use super::api::ErrorBody;

/// The name of the security scheme in the OpenAPI document.
pub const SCHEME: &str = "api_token";

/// Why authentication could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the API token file '{}': {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API token file '{}' is empty (expected a secret on its first line)", path.display())]
    Empty { path: PathBuf },
    #[error(
        "refusing to serve the API's writing routes on {addr} without a token: anyone who can reach it could change specifications and builds. Give a token (--api-token-file FILE or KILN_CI_API_TOKEN_FILE) or listen on a loopback address (127.0.0.1, [::1])"
    )]
    OpenWrites { addr: SocketAddr },
}

/// The secret that writing requests must present.
#[derive(Clone)]
pub struct ApiToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(…)")
    }
}

impl ApiToken {
    /// A token for `secret` (surrounding white space is not part of it).
    /// `None` for an empty secret, which would let everyone in.
    pub fn new(secret: &str) -> Option<ApiToken> {
        let secret = secret.trim();
        (!secret.is_empty()).then(|| ApiToken {
            digest: Sha256::digest(secret.as_bytes()).into(),
        })
    }

    /// The token on the first line of `path`.
    pub fn from_file(path: &Path) -> Result<ApiToken, AuthError> {
        let secret = read_token_file(path)?;
        ApiToken::new(&secret).ok_or_else(|| AuthError::Empty {
            path: path.to_owned(),
        })
    }

    /// Whether `presented` is the secret, in time independent of both.
    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(self.digest.ct_eq(&digest))
    }
}

/// The secret on the first line of `path`, for a client to send.
pub fn read_token_file(path: &Path) -> Result<String, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        source,
    })?;
    let secret = text.lines().next().unwrap_or_default().trim();
    if secret.is_empty() {
        return Err(AuthError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(secret.to_owned())
}

/// Refuses open writes on an address other machines can reach.
pub fn check_listen(addr: SocketAddr, token: Option<&ApiToken>) -> Result<(), AuthError> {
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(AuthError::OpenWrites { addr });
    }
    Ok(())
}

/// Whether a request with `method` changes something.
pub fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The middleware: writing requests need the bearer token, if one is set.
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.api_token else {
        return next.run(request).await;
    };
    if !is_write(request.method()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let problem = match presented {
        Some(secret) if token.matches(secret.trim()) => return next.run(request).await,
        Some(_) => "the bearer token is wrong",
        None => {
            "this request changes something and needs 'Authorization: Bearer <token>' (the token of kiln-ci's --api-token-file)"
        }
    };
    tracing::warn!(method = %request.method(), uri = %request.uri(), problem, "write refused");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"kiln-ci\"")],
        axum::Json(ErrorBody {
            error: problem.to_owned(),
        }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_themselves() {
        let token = ApiToken::new("  s3cret\n").unwrap();
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches("s3cret2"));
        assert!(!token.matches(""));
        assert!(ApiToken::new(" \n").is_none());
        assert_eq!(format!("{token:?}"), "ApiToken(…)");
    }

    #[test]
    fn open_writes_only_on_loopback() {
        let token = ApiToken::new("x").unwrap();
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let err = check_listen(public, None).unwrap_err();
        assert!(err.to_string().contains("--api-token-file"), "{err}");
        check_listen(public, Some(&token)).unwrap();
        check_listen("127.0.0.1:8080".parse().unwrap(), None).unwrap();
        check_listen("[::1]:8080".parse().unwrap(), None).unwrap();
        assert!(check_listen("[::]:8080".parse().unwrap(), None).is_err());
    }

    #[test]
    fn token_files_are_read_and_empty_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "abc\nignored\n").unwrap();
        assert!(ApiToken::from_file(&file).unwrap().matches("abc"));
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(
            ApiToken::from_file(&file),
            Err(AuthError::Empty { .. })
        ));
        assert!(matches!(
            ApiToken::from_file(&dir.path().join("missing")),
            Err(AuthError::Read { .. })
        ));
    }
}

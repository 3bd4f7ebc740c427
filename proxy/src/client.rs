//! A client of the local integrator API over the Unix-domain socket, used
//! by the `rs-proxy send` CLI and the example integrator.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::api::{Registered, SendRequest, Sent};

/// Why a call to the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the proxy at {path}: {reason} (is rs-proxy running?)")]
    Connect { path: String, reason: String },
    #[error("the proxy answered {status}: {text}")]
    Refused { status: u16, text: String },
    #[error("{0}")]
    Other(String),
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Talks to one proxy, keeping its connection open between calls.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
    conn: std::sync::Arc<tokio::sync::Mutex<Option<Conn>>>,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
            timeout: Duration::from_secs(30),
            conn: std::sync::Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// The same client with a different time limit per call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Hands a file over for upload (the proxy hashes it first, so this
    /// can take a while for a large file); returns the upload.
    pub async fn upload(
        &self,
        req: &crate::bulk::UploadRequest,
    ) -> Result<crate::bulk::Upload, ClientError> {
        let v = self
            .call(http::Method::POST, "/v1/uploads", Some(req))
            .await?;
        serde_json::from_value(v).map_err(|e| ClientError::Other(e.to_string()))
    }

    /// One upload's state.
    pub async fn upload_state(&self, id: &str) -> Result<crate::bulk::Upload, ClientError> {
        let v = self
            .call::<()>(http::Method::GET, &format!("/v1/uploads/{id}"), None)
            .await?;
        serde_json::from_value(v).map_err(|e| ClientError::Other(e.to_string()))
    }

    /// Every upload, newest first.
    pub async fn uploads(&self) -> Result<Vec<crate::bulk::Upload>, ClientError> {
        let v = self
            .call::<()>(http::Method::GET, "/v1/uploads", None)
            .await?;
        serde_json::from_value(v).map_err(|e| ClientError::Other(e.to_string()))
    }

    /// One request; returns the JSON body of a 200 answer.
    pub async fn call<T: Serialize>(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&T>,
    ) -> Result<serde_json::Value, ClientError> {
        let bytes = match body {
            Some(b) => {
                Bytes::from(serde_json::to_vec(b).map_err(|e| ClientError::Other(e.to_string()))?)
            }
            None => Bytes::new(),
        };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "rs-proxy")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))
            .map_err(|e| ClientError::Other(e.to_string()))?;
        let fut = async {
            let mut guard = self.conn.lock().await;
            let mut req = Some(req);
            let resp = loop {
                let Some(r) = req.take() else {
                    return Err(ClientError::Other("no request".into()));
                };
                let reused = match guard.as_mut() {
                    Some(c) => c.ready().await.is_ok(),
                    None => false,
                };
                if !reused {
                    *guard = Some(self.connect().await?);
                }
                let Some(send) = guard.as_mut() else {
                    return Err(ClientError::Other("no connection".into()));
                };
                match send.try_send_request(r).await {
                    Ok(resp) => break resp,
                    Err(mut e) => {
                        *guard = None;
                        // The kept connection was closed (the proxy
                        // stopping or reloading) before the request went
                        // out: hyper hands it back, and it is sent once
                        // more on a new connection. A request that went out
                        // is never sent again (it may have been taken).
                        match e.take_message() {
                            Some(unsent) if reused => req = Some(unsent),
                            _ => return Err(ClientError::Other(e.into_error().to_string())),
                        }
                    }
                }
            };
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 16 << 20)
                .collect()
                .await
                .map_err(|e| ClientError::Other(e.to_string()))?
                .to_bytes();
            let v: serde_json::Value =
                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            if status != http::StatusCode::OK {
                let text = v
                    .get("error")
                    .and_then(|e| e.as_str())
                    .map(str::to_owned)
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
                return Err(ClientError::Refused {
                    status: status.as_u16(),
                    text,
                });
            }
            Ok(v)
        };
        tokio::time::timeout(self.timeout, fut).await.map_err(|_| {
            ClientError::Other(format!(
                "no answer from {} within {:?}",
                self.socket.display(),
                self.timeout
            ))
        })?
    }

    async fn connect(&self) -> Result<Conn, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| ClientError::Connect {
                path: self.socket.display().to_string(),
                reason: e.to_string(),
            })?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Other(e.to_string()))?;
        tokio::spawn(conn);
        Ok(send)
    }

    /// Registers (or re-registers) an integrator; returns its RS ID.
    pub async fn register_integrator(
        &self,
        name: &str,
        version: &str,
        platform: &str,
    ) -> Result<String, ClientError> {
        let v = self
            .call(
                http::Method::POST,
                "/v1/integrators",
                Some(&serde_json::json!({"name": name, "version": version, "platform": platform})),
            )
            .await?;
        let r: Registered =
            serde_json::from_value(v).map_err(|e| ClientError::Other(e.to_string()))?;
        Ok(r.id)
    }

    /// Sends an alarm, event or data (`what`); returns the message ID once
    /// the proxy has spooled it durably.
    pub async fn send(&self, what: &str, req: &SendRequest) -> Result<String, ClientError> {
        let v = self
            .call(http::Method::POST, &format!("/v1/{what}"), Some(req))
            .await?;
        let r: Sent = serde_json::from_value(v).map_err(|e| ClientError::Other(e.to_string()))?;
        Ok(r.message_id)
    }

    /// Sends many messages in one call (`what` and request each); returns
    /// one result per message, in order: its ID once the proxy has spooled
    /// it durably (all in one transaction), or why not.
    pub async fn send_batch(
        &self,
        items: Vec<crate::api::BatchItem>,
    ) -> Result<Vec<crate::api::BatchResult>, ClientError> {
        let v = self
            .call(
                http::Method::POST,
                "/v1/batch",
                Some(&crate::api::BatchRequest { messages: items }),
            )
            .await?;
        let r: crate::api::BatchReply =
            serde_json::from_value(v).map_err(|e| ClientError::Other(e.to_string()))?;
        Ok(r.results)
    }

    pub async fn status(&self) -> Result<serde_json::Value, ClientError> {
        self.call::<()>(http::Method::GET, "/v1/status", None).await
    }

    /// Where message `id` is (`GET /v1/messages/{id}`).
    pub async fn trace(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.call::<()>(http::Method::GET, &format!("/v1/messages/{id}"), None)
            .await
    }
}

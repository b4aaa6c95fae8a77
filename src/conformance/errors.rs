//! Malformed, oversized and unauthenticated requests on the Connect
//! mapping, over HTTP/1.1 and h2, and an early error on a kept-alive
//! HTTP/1.1 connection.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::peer::RawAgent;
use super::{Check, Ctx, ensure};
use crate::net::Alpn;

/// The body sent as oversized: twice the message limit of the reference
/// backend (4 MiB, docs/PROTOCOL.md "Every limit"), far above anything an
/// agent sends.
pub const OVERSIZED_BYTES: usize = 8 << 20;

/// How long one raw request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// One answer: status, content type, body.
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Answer {
    /// The `code` of a Connect error body, or why there is none.
    fn connect_code(&self) -> Result<String, String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).map_err(|_| {
            format!(
                "HTTP {} without a Connect error body: {:?}",
                self.status,
                String::from_utf8_lossy(&self.body[..self.body.len().min(120)])
            )
        })?;
        v.get("code")
            .and_then(|c| c.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("HTTP {} with a JSON body without \"code\"", self.status))
    }

    /// Checks a Connect error: one of `statuses`, JSON, `code`.
    fn expect(&self, what: &str, statuses: &[u16], code: &str) -> Check {
        let got = self.connect_code().map_err(|e| format!("{what}: {e}"))?;
        ensure(statuses.contains(&self.status) && got == code, || {
            format!(
                "{what}: want HTTP {statuses:?} with code {code:?}, got HTTP {} with code {got:?}",
                self.status
            )
        })?;
        ensure(self.content_type.starts_with("application/json"), || {
            format!(
                "{what}: a Connect error body has content-type application/json, got {:?}",
                self.content_type
            )
        })
    }
}

/// A client of one HTTP version (`Alpn::Http1` or `Alpn::H2`).
struct Raw {
    client: Client<crate::net::Connector, Full<Bytes>>,
    base: String,
    version: &'static str,
}

impl Raw {
    fn new(ctx: &Ctx, alpn: Alpn) -> Raw {
        let mut b = Client::builder(TokioExecutor::new());
        if alpn == Alpn::H2 {
            b.http2_only(true);
        }
        Raw {
            client: b.build(ctx.net.connector(alpn)),
            base: ctx.backend.to_string().trim_end_matches('/').to_string(),
            version: if alpn == Alpn::H2 { "h2" } else { "HTTP/1.1" },
        }
    }

    /// POSTs `body` to `/uplink.v1.AgentService/<method>`.
    async fn post(
        &self,
        method: &str,
        content_type: &str,
        credential: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Answer, String> {
        let mut req = http::Request::post(format!("{}/uplink.v1.AgentService/{method}", self.base))
            .header(http::header::CONTENT_TYPE, content_type)
            .header("connect-protocol-version", "1");
        if let Some(c) = credential {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {c}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("building a request: {e}"))?;
        let work = async {
            let resp = self.client.request(req).await.map_err(|e| {
                format!(
                    "{method} over {}: {}",
                    self.version,
                    crate::client::describe(&e)
                )
            })?;
            let status = resp.status().as_u16();
            let content_type = resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the answer over {}: {e}", self.version))?
                .to_bytes()
                .to_vec();
            Ok(Answer {
                status,
                content_type,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .map_err(|_| {
                format!(
                    "{method} over {}: no answer within {REQUEST_TIMEOUT:?}",
                    self.version
                )
            })?
    }
}

/// Malformed and oversized requests (docs/PROTOCOL.md, "The Connect unary
/// mapping"), over HTTP/1.1 and h2: a body that is not valid protobuf, or
/// not valid JSON, is answered 400 with a Connect JSON error body of code
/// `invalid_argument`; a body over the backend's limit (8 MiB sent) is
/// `resource_exhausted` (413, or 429 as Connect maps the code); a call
/// without a credential is 401 `unauthenticated`; an ack above 2^53
/// (`SubscribeRequest.ack`, "rules as for" every ack) is 400
/// `invalid_argument`. On HTTP/1.1, an error
/// answered before the request body arrived either says `Connection:
/// close` or leaves the connection fit for the next call.
pub(super) async fn malformed(ctx: &Ctx) -> Check {
    let a = RawAgent::enroll(ctx, "malformed").await?;
    let cred = a.credential.expose().to_string();
    for alpn in [Alpn::Http1, Alpn::H2] {
        let raw = Raw::new(ctx, alpn);
        let v = raw.version;
        raw.post("Report", "application/proto", Some(&cred), vec![0xff; 4])
            .await?
            .expect(
                &format!("an invalid protobuf body over {v}"),
                &[400],
                "invalid_argument",
            )?;
        raw.post(
            "Report",
            "application/json",
            Some(&cred),
            b"{\"ack\": ".to_vec(),
        )
        .await?
        .expect(
            &format!("an invalid JSON body over {v}"),
            &[400],
            "invalid_argument",
        )?;
        raw.post("Poll", "application/json", None, b"{}".to_vec())
            .await?
            .expect(
                &format!("a Poll without a credential over {v}"),
                &[401],
                "unauthenticated",
            )?;
        raw.post(
            "Poll",
            "application/json",
            Some(&cred),
            br#"{"ack":"9007199254740993","holdMs":1}"#.to_vec(),
        )
        .await?
        .expect(
            &format!("a Poll with ack 2^53 + 1 over {v}"),
            &[400],
            "invalid_argument",
        )?;
        raw.post(
            "Report",
            "application/proto",
            Some(&cred),
            vec![0; OVERSIZED_BYTES],
        )
        .await?
        .expect(
            &format!("a body of {OVERSIZED_BYTES} bytes over {v}"),
            &[413, 429],
            "resource_exhausted",
        )?;
    }
    early_error_keeps_connection_usable(ctx, &cred).await
}

/// A request head without a credential, its body 300 ms later, then a good
/// call on the same HTTP/1.1 connection unless the first answer closed it.
async fn early_error_keeps_connection_usable(ctx: &Ctx, credential: &str) -> Check {
    let host = ctx
        .backend
        .authority()
        .map(|a| a.as_str())
        .unwrap_or("")
        .to_string();
    let mut conn = tokio::time::timeout(
        REQUEST_TIMEOUT,
        ctx.net.connector(Alpn::Http1).connect(&ctx.backend),
    )
    .await
    .map_err(|_| "connecting over HTTP/1.1: timed out".to_string())?
    .map_err(|e| format!("connecting over HTTP/1.1: {e}"))?;
    let body = b"{\"ack\":\"0\",\"holdMs\":1}";
    let head = format!(
        "POST /uplink.v1.AgentService/Poll HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let io = |e: std::io::Error| format!("HTTP/1.1 connection: {e}");
    conn.write_all(head.as_bytes()).await.map_err(io)?;
    conn.flush().await.map_err(io)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.write_all(body).await.map_err(io)?;
    conn.flush().await.map_err(io)?;
    let (status, close) = read_head_and_body(&mut conn).await?;
    ensure(status == 401, || {
        format!(
            "a Poll without a credential (body sent late) over HTTP/1.1: want 401, got {status}"
        )
    })?;
    if close {
        return Ok(());
    }
    let good = format!(
        "POST /uplink.v1.AgentService/Poll HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\nauthorization: Bearer {credential}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let second = async {
        conn.write_all(good.as_bytes()).await.map_err(io)?;
        conn.write_all(body).await.map_err(io)?;
        conn.flush().await.map_err(io)?;
        read_head_and_body(&mut conn).await
    };
    match second.await {
        Ok((200, _)) => Ok(()),
        Ok((s, _)) => Err(format!(
            "the call after an early 401 on a kept-alive HTTP/1.1 connection got HTTP {s}, not 200"
        )),
        Err(e) => Err(format!(
            "an early 401 over HTTP/1.1 kept the connection open (no `Connection: close`), but the next call on it failed: {e}"
        )),
    }
}

/// Reads one HTTP/1.1 answer with a `content-length` body: its status, and
/// whether it said `Connection: close`.
async fn read_head_and_body<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(u16, bool), String> {
    let work = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = resp
                .parse(&buf)
                .map_err(|e| format!("not an HTTP/1.1 answer: {e}"))?
            {
                let status = resp.code.unwrap_or(0);
                let header = |name: &str| {
                    resp.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
                };
                let close = header("connection").is_some_and(|v| v.contains("close"));
                let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
                let len: usize = header("content-length")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = buf.split_off(n);
                let more = async |body: &mut Vec<u8>, s: &mut S| {
                    let mut chunk = [0u8; 4096];
                    let k = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
                    if k == 0 {
                        return Err("the connection closed in the middle of an answer".to_string());
                    }
                    body.extend_from_slice(&chunk[..k]);
                    Ok(())
                };
                if chunked {
                    // Chunks to the last (size 0), then the trailer
                    // section's end.
                    let mut pos = 0;
                    loop {
                        match httparse::parse_chunk_size(&body[pos..]) {
                            Ok(httparse::Status::Complete((used, 0))) => {
                                let rest = pos + used;
                                if body.len() >= rest + 2
                                    && (body[rest..].starts_with(b"\r\n")
                                        || body[rest..].windows(4).any(|w| w == b"\r\n\r\n"))
                                {
                                    break;
                                }
                            }
                            Ok(httparse::Status::Complete((used, size))) => {
                                let next = pos + used + size as usize + 2;
                                if body.len() >= next {
                                    pos = next;
                                    continue;
                                }
                            }
                            Ok(httparse::Status::Partial) => {}
                            Err(_) => return Err("a chunked answer with a bad chunk size".into()),
                        }
                        more(&mut body, s).await?;
                    }
                } else {
                    while body.len() < len {
                        more(&mut body, s).await?;
                    }
                }
                return Ok((status, close));
            }
            let k = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if k == 0 {
                return Err("the connection closed without an answer".into());
            }
            buf.extend_from_slice(&chunk[..k]);
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
}

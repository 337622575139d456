//! The HTTP client of the server tests (`tests/serve.rs`) and the load generator
//! (`examples/load/`, which includes this file by path): `ureq` on loopback, one connection per
//! request (no pooling, as a fresh client each time), 4xx and 5xx answers read like any other
//! (status, headers, body), and server-sent events read as they arrive.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ureq::http;

/// A whole response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> io::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("response body is not JSON ({e}): {}", self.text()),
            )
        })
    }
}

/// Header names (lowercased) and values, in order.
type Headers = Vec<(String, String)>;

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// An agent that answers every status as a response, with `timeout` on connecting and on
/// every read and write (not on the whole exchange: a long stream may take longer).
fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_idle_connections(0)
        .timeout_connect(Some(timeout))
        .timeout_per_read(Some(timeout))
        .timeout_per_write(Some(timeout))
        .build()
        .into()
}

fn to_io(error: ureq::Error) -> io::Error {
    match error {
        ureq::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

/// Sends `method path` with `body` (as `application/json`; none for GET) and returns the
/// response's status, its headers (names lowercased) and its body, unread.
fn run(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<(u16, Headers, ureq::BodyReader<'static>)> {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    let agent = agent(timeout);
    let response = if method == "GET" {
        agent.run(request.body(()).map_err(io::Error::other)?)
    } else {
        agent.run(request.body(body).map_err(io::Error::other)?)
    };
    let response = response.map_err(to_io)?;
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    Ok((
        response.status().as_u16(),
        headers,
        response.into_body().into_reader(),
    ))
}

/// Sends `method path` with `body` (as `application/json`) and reads the whole response.
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let (status, headers, mut reader) = run(addr, method, path, body, timeout)?;
    let mut body = Vec::new();
    reader.read_to_end(&mut body)?;
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// `GET path`.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<HttpResponse> {
    send(addr, "GET", path, b"", timeout)
}

/// `POST path` with a JSON body.
pub fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
    timeout: Duration,
) -> io::Result<HttpResponse> {
    send(addr, "POST", path, body.to_string().as_bytes(), timeout)
}

/// One request's response, its head read, its body readable as server-sent events. Dropping it
/// (or [`Connection::disconnect`]) closes the connection mid-body, as a client that goes away.
pub struct Connection {
    reader: BufReader<ureq::BodyReader<'static>>,
    /// Status code.
    pub status: u16,
    /// Headers in order, names lowercased.
    pub headers: Vec<(String, String)>,
}

impl Connection {
    /// Sends the request and reads the status line and headers.
    pub fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> io::Result<Self> {
        let (status, headers, reader) = run(addr, method, path, body, timeout)?;
        Ok(Self {
            reader: BufReader::new(reader),
            status,
            headers,
        })
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The rest of the body.
    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        self.reader.read_to_end(&mut body)?;
        Ok(body)
    }

    /// The `data` of the next server-sent event, or `None` at the end of the body.
    pub fn next_event_data(&mut self) -> io::Result<Option<String>> {
        let mut data: Vec<String> = Vec::new();
        let mut in_event = false;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return if in_event {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the body ended inside an event",
                    ))
                } else {
                    Ok(None)
                };
            }
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !data.is_empty() {
                    return Ok(Some(data.join("\n")));
                }
                // The end of a comment or keep-alive.
                in_event = false;
                continue;
            }
            in_event = true;
            if let Some(d) = line.strip_prefix("data:") {
                data.push(d.strip_prefix(' ').unwrap_or(d).to_string());
            }
        }
    }

    /// Closes the connection, as a client that goes away does.
    pub fn disconnect(self) {
        drop(self);
    }
}

/// Connects and sends a request without reading the response: the caller drops the stream, as
/// a client that goes away before the answer does. Raw on `TcpStream` because ureq (like any
/// client) returns only once the response head has arrived, and a whole response's head comes
/// when its generation is done.
pub fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<TcpStream> {
    let mut stream = connect_with_head(addr, method, path, body.len(), timeout)?;
    stream.write_all(body)?;
    stream.flush()?;
    Ok(stream)
}

/// A connection with a request's head written (`Connection: close`, a JSON body of `len`
/// bytes to follow).
fn connect_with_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    len: usize,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    stream.write_all(head.as_bytes())?;
    Ok(stream)
}

/// `method path` with a body the server may refuse before reading it all (413): the head and
/// as much of the body as the server takes are written (a reset or broken pipe once it has
/// answered is expected), then its answer is read as a whole response. ureq cannot read a
/// response after its write failed, which is what a real client does here.
pub fn send_refused_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let mut stream = connect_with_head(addr, method, path, body.len(), timeout)?;
    match stream.write_all(body) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) => {}
        other => other?,
    }
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !raw.is_empty() => {}
        other => {
            other?;
        }
    }
    parse_response(&raw)
}

/// A whole HTTP/1.1 response read to the connection's close (plain or chunked body).
fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no end of the response head"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("no status line"))?;
    let headers: Headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if find_header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut reader = BufReader::new(body.as_slice());
        let mut plain = Vec::new();
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size =
                usize::from_str_radix(size.trim(), 16).map_err(|_| invalid("bad chunk size"))?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            plain.extend_from_slice(&chunk[..size]);
        }
        body = plain;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

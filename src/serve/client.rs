//! A minimal blocking HTTP/1.1 client for loopback use by the tests and the load generator:
//! one connection per request (`Connection: close`), bodies framed by `Content-Length`,
//! chunked encoding or the end of the connection, and server-sent events read as they arrive.
//! It leaves the server's side untouched, so a test can also drop a connection mid-stream.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

/// Longest status line or header line accepted.
const MAX_LINE: usize = 64 << 10;

/// A whole response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body, unframed.
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

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Sends `method path` with `body` (as `application/json`) and reads the whole response.
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let mut connection = Connection::open(addr, method, path, body, timeout)?;
    let body = connection.read_to_end()?;
    Ok(HttpResponse {
        status: connection.status,
        headers: connection.headers,
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

enum Framing {
    Length(usize),
    Chunked { left_in_chunk: usize },
    UntilClose,
    Done,
}

/// One request's connection, its response head read, its body readable piece by piece.
pub struct Connection {
    reader: BufReader<TcpStream>,
    /// Status code.
    pub status: u16,
    /// Headers in order, names lowercased.
    pub headers: Vec<(String, String)>,
    framing: Framing,
    /// Body bytes read but not yet split into events.
    events_buffer: Vec<u8>,
}

impl Connection {
    /// Connects, sends the request and reads the status line and headers.
    pub fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> io::Result<Self> {
        let stream = send_request(addr, method, path, body, timeout)?;
        let mut reader = BufReader::new(stream);
        let status_line = read_line(&mut reader)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = read_line(&mut reader)?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        let framing = if find_header(&headers, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked { left_in_chunk: 0 }
        } else if let Some(length) = find_header(&headers, "content-length") {
            Framing::Length(
                length
                    .parse()
                    .map_err(|_| invalid(format!("bad content-length {length:?}")))?,
            )
        } else {
            Framing::UntilClose
        };
        Ok(Self {
            reader,
            status,
            headers,
            framing,
            events_buffer: Vec::new(),
        })
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The next piece of the body, or `None` at its end.
    pub fn read_piece(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            match self.framing {
                Framing::Done | Framing::Length(0) => {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                Framing::Length(left) => {
                    let piece = self.read_up_to(left)?;
                    if piece.is_empty() {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    self.framing = Framing::Length(left - piece.len());
                    return Ok(Some(piece));
                }
                Framing::Chunked { left_in_chunk: 0 } => {
                    let line = read_line(&mut self.reader)?;
                    let size_text = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(size_text, 16)
                        .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
                    if size == 0 {
                        // Trailers, then the blank line that ends the body.
                        while !read_line(&mut self.reader)?.is_empty() {}
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    self.framing = Framing::Chunked {
                        left_in_chunk: size,
                    };
                }
                Framing::Chunked { left_in_chunk } => {
                    let piece = self.read_up_to(left_in_chunk)?;
                    if piece.is_empty() {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let left = left_in_chunk - piece.len();
                    if left == 0 {
                        read_line(&mut self.reader)?; // the CRLF after the chunk
                    }
                    self.framing = Framing::Chunked {
                        left_in_chunk: left,
                    };
                    return Ok(Some(piece));
                }
                Framing::UntilClose => {
                    let piece = self.read_up_to(16 << 10)?;
                    if piece.is_empty() {
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    return Ok(Some(piece));
                }
            }
        }
    }

    fn read_up_to(&mut self, most: usize) -> io::Result<Vec<u8>> {
        let mut buffer = vec![0; most.min(16 << 10)];
        let read = self.reader.read(&mut buffer)?;
        buffer.truncate(read);
        Ok(buffer)
    }

    /// The rest of the body.
    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        let mut body = std::mem::take(&mut self.events_buffer);
        while let Some(piece) = self.read_piece()? {
            body.extend_from_slice(&piece);
        }
        Ok(body)
    }

    /// The `data` of the next server-sent event, or `None` at the end of the body.
    pub fn next_event_data(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = find(&self.events_buffer, b"\n\n") {
                let event: Vec<u8> = self.events_buffer.drain(..end + 2).collect();
                let text = String::from_utf8(event)
                    .map_err(|_| invalid("an event is not valid UTF-8".into()))?;
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|line| line.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Ok(Some(data.join("\n")));
            }
            match self.read_piece()? {
                Some(piece) => self.events_buffer.extend_from_slice(&piece),
                None if self.events_buffer.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                None => return Err(invalid("the body ended inside an event".into())),
            }
        }
    }

    /// Closes the connection in both directions, as a client that goes away does.
    pub fn disconnect(self) {
        let _ = self.reader.get_ref().shutdown(Shutdown::Both);
    }
}

/// Connects and sends a request without reading the response: the caller may read the stream
/// or drop it, as a client that goes away before the answer does.
pub fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    Ok(stream)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A CRLF- or LF-terminated line without its terminator.
fn read_line(reader: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = Vec::new();
    let read = reader
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)?;
    if read == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if line.last() != Some(&b'\n') {
        return Err(invalid("a line is too long or cut off".into()));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| invalid("a header line is not UTF-8".into()))
}

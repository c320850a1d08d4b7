//! A TCP server written against `std::net`, as any program that "binds `$PORT`" is: it listens
//! on `0.0.0.0:$PORT` (as Heroku apps do) and serves many connections at once with `poll`.
//!
//! A line protocol, one answer per line (`\n`-terminated):
//!
//! - any other line: `INSTANCE COUNT LINE`, where COUNT counts the lines this instance has
//!   answered over all its connections (state that lives as long as the instance);
//! - `crash`: panics (a trap);
//! - `bomb`: allocates until its memory limit stops it;
//! - `connect ADDR`: tries an outgoing connection: `connected ADDR` or `refused ADDR: ERROR`;
//! - `listen PORT`: tries to listen on another port: `listening PORT` or `refused PORT: ERROR`;
//! - `quit`: closes the connection.
//!
//! A connection whose first line is an HTTP/1.x request line (`GET /path HTTP/1.1`) is served
//! as HTTP instead: every request gets `200 OK` with the body `INSTANCE COUNT PATH\n`, and the
//! connection is kept alive unless the client says `Connection: close`. So the same component
//! is a socket-based web server when it runs as `web`.
//!
//! Arguments: `never-listen` runs without ever listening; `listen-elsewhere` listens on
//! `PORT + 1` instead of `PORT`.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

fn main() {
    let instance = std::env::var("WASMFORM_INSTANCE").unwrap_or_else(|_| "?".into());
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .expect("PORT is set to a port number");
    let port = match std::env::args().nth(1).as_deref() {
        Some("never-listen") => {
            println!("{instance} running without listening");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Some("listen-elsewhere") => port + 1,
        _ => port,
    };
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("{instance} cannot listen on 0.0.0.0:{port}: {e}");
            std::process::exit(1);
        }
    };
    listener.set_nonblocking(true).expect("non-blocking listener");
    println!("{instance} listening on 0.0.0.0:{port}");

    let mut server = Server {
        instance,
        count: 0,
    };
    let mut conns: Vec<Conn> = Vec::new();
    loop {
        let mut fds = vec![libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for conn in &conns {
            let out = if conn.output.is_empty() {
                0
            } else {
                libc::POLLOUT
            };
            fds.push(libc::pollfd {
                fd: conn.stream.as_raw_fd(),
                events: libc::POLLIN | out,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, -1) };
        if ready < 0 {
            continue;
        }
        let known = conns.len();
        if fds[0].revents != 0 {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(true).expect("non-blocking stream");
                        conns.push(Conn::new(stream));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        eprintln!("accept failed: {e}");
                        break;
                    }
                }
            }
        }
        for (conn, fd) in conns.iter_mut().take(known).zip(&fds[1..]) {
            if fd.revents != 0 {
                conn.service(&mut server);
            }
        }
        conns.retain(|c| !c.done);
    }
}

/// What lives as long as the instance.
struct Server {
    instance: String,
    /// Lines (or HTTP requests) answered, over every connection.
    count: u64,
}

/// One client connection.
struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Decided by the first line: an HTTP client or a line-protocol one.
    http: Option<bool>,
    /// Close once `output` is written.
    closing: bool,
    done: bool,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            http: None,
            closing: false,
            done: false,
        }
    }

    /// Reads what is there, answers every complete line or request, writes what it can.
    fn service(&mut self, server: &mut Server) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.done = true;
                    return;
                }
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.done = true;
                    return;
                }
            }
        }
        while !self.closing && self.answer_one(server) {}
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => {
                    self.done = true;
                    return;
                }
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.done = true;
                    return;
                }
            }
        }
        if self.closing {
            self.done = true;
        }
    }

    /// Answers the first complete line (or HTTP request head) of the input, if there is one.
    fn answer_one(&mut self, server: &mut Server) -> bool {
        let Some(end) = self.input.iter().position(|&b| b == b'\n') else {
            return false;
        };
        let http = *self.http.get_or_insert_with(|| {
            let first = String::from_utf8_lossy(&self.input[..end]);
            first.trim_end().ends_with(" HTTP/1.1") || first.trim_end().ends_with(" HTTP/1.0")
        });
        if http {
            return self.answer_http(server);
        }
        let line: Vec<u8> = self.input.drain(..=end).collect();
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        let answer = match line.split_once(' ').unwrap_or((line.as_str(), "")) {
            ("crash", _) => panic!("{} asked to crash", server.instance),
            ("bomb", _) => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            ("quit", _) => {
                self.closing = true;
                return false;
            }
            ("connect", addr) => match TcpStream::connect(addr) {
                Ok(_) => format!("connected {addr}"),
                Err(e) => format!("refused {addr}: {e}"),
            },
            ("listen", port) => match TcpListener::bind(("127.0.0.1", port.parse().unwrap_or(0))) {
                Ok(_) => format!("listening {port}"),
                Err(e) => format!("refused {port}: {e}"),
            },
            _ => {
                server.count += 1;
                format!("{} {} {line}", server.instance, server.count)
            }
        };
        self.output.extend_from_slice(answer.as_bytes());
        self.output.push(b'\n');
        true
    }

    /// Answers one HTTP/1.x request once its head is complete (bodies are not read: GET only).
    fn answer_http(&mut self, server: &mut Server) -> bool {
        let Some(end) = self.input.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head: Vec<u8> = self.input.drain(..end + 4).collect();
        let head = String::from_utf8_lossy(&head);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let close = head.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("connection:") && l.contains("close")
        });
        server.count += 1;
        let body = format!("{} {} {path}\n", server.instance, server.count);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        self.output.extend_from_slice(response.as_bytes());
        if close {
            self.closing = true;
        }
        true
    }
}

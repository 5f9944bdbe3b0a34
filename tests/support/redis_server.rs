//! A real `redis-server` on 127.0.0.1 that a test starts itself (Debian's package; `.ci/run`
//! installs it), plain or with TLS, and a test CA made with the `openssl` command line.
#![cfg(feature = "redis")]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// A CA and the certificates it signed, in a directory of their own, removed when dropped:
/// `ca.crt`, `server.crt`/`server.key` (for 127.0.0.1), `client.crt`/`client.key`, and
/// `other-ca.crt`, a CA that signed nothing here.
pub struct TestCa {
    dir: PathBuf,
}

impl TestCa {
    /// Makes the CA and its certificates with `openssl` (RSA 2048, valid for a day).
    pub fn new(name: &str) -> TestCa {
        let dir = std::env::temp_dir().join(format!("tmf-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for the test CA");
        let ca = TestCa { dir };
        for authority in ["ca", "other-ca"] {
            ca.openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                &format!("/CN=tmf test {authority}"),
                "-keyout",
                &format!("{authority}.key"),
                "-out",
                &format!("{authority}.crt"),
            ]);
        }
        for (leaf, extension) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(ca.path(&format!("{leaf}.ext")), extension).expect("an extension file");
            ca.openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN=tmf test {leaf}"),
                "-keyout",
                &format!("{leaf}.key"),
                "-out",
                &format!("{leaf}.csr"),
            ]);
            ca.openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{leaf}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &format!("{leaf}.ext"),
                "-out",
                &format!("{leaf}.crt"),
            ]);
        }
        ca
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl (Debian's package openssl; .ci/run installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A file of the CA's directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A file's contents.
    pub fn pem(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).expect("a file of the test CA")
    }

    /// A file's path as a string, for a config.
    pub fn file(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How the server takes connections.
#[derive(Clone)]
struct Tls {
    dir: PathBuf,
    client_certificates: bool,
}

/// A `redis-server` on 127.0.0.1, without persistence, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    tls: Option<Tls>,
    password: Option<String>,
}

impl RedisServer {
    /// A plain server, no password.
    pub fn start() -> RedisServer {
        RedisServer::start_with(None, None)
    }

    /// A server that takes TLS connections only (its certificate signed by `ca`), asks for a
    /// client certificate when `client_certificates`, and wants `password` when given.
    pub fn start_tls(
        ca: &TestCa,
        client_certificates: bool,
        password: Option<&str>,
    ) -> RedisServer {
        let tls = Tls {
            dir: ca.dir.clone(),
            client_certificates,
        };
        RedisServer::start_with(Some(tls), password.map(str::to_owned))
    }

    fn start_with(tls: Option<Tls>, password: Option<String>) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            tls,
            password,
        };
        server.restart();
        server
    }

    /// (Re)starts the server on its port and waits until it answers.
    pub fn restart(&mut self) {
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match &self.tls {
            None => {
                command.args(["--port", &port]);
            }
            Some(tls) => {
                let file = |name: &str| tls.dir.join(name).display().to_string();
                let auth = if tls.client_certificates { "yes" } else { "no" };
                command
                    .args(["--port", "0", "--tls-port", &port])
                    .args(["--tls-cert-file", &file("server.crt")])
                    .args(["--tls-key-file", &file("server.key")])
                    .args(["--tls-ca-cert-file", &file("ca.crt")])
                    .args(["--tls-auth-clients", auth]);
            }
        }
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .spawn()
            .expect("redis-server (the Debian package redis-server; .ci/run installs it)");
        self.child = Some(child);
        for _ in 0..200 {
            if self.ready() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// A plain server answers PING; a TLS one is ready once it listens (it opens its port
    /// when it is).
    fn ready(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        if self.tls.is_some() || self.password.is_some() {
            return true;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut buf).is_ok()
            && &buf == b"+PONG\r\n"
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `redis://` or `rediss://`, with the password when there is one.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = self
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}/", self.port)
    }

    /// A synchronous client, for looking at what the stores wrote.
    pub fn conn(&self) -> redis::Connection {
        let client = match &self.tls {
            None => redis::Client::open(self.url()),
            #[cfg(feature = "redis-tls")]
            Some(tls) => {
                let pem = |name: &str| std::fs::read(tls.dir.join(name)).expect("a test CA file");
                redis::Client::build_with_tls(
                    self.url(),
                    redis::TlsCertificates {
                        client_tls: Some(redis::ClientTlsConfig {
                            client_cert: pem("client.crt"),
                            client_key: pem("client.key"),
                        }),
                        root_cert: Some(pem("ca.crt")),
                    },
                )
            }
            #[cfg(not(feature = "redis-tls"))]
            Some(_) => panic!("a TLS server needs the redis-tls feature"),
        };
        client
            .and_then(|c| c.get_connection())
            .expect("a connection to the test's redis-server")
    }

    pub fn pttl(&self, key: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(key)
            .query(&mut self.conn())
            .expect("PTTL")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

//! Client commands against a host elsewhere (`--remote`): the control API over TCP with a
//! bearer token, HTTPS with a certificate the client pins, token rotation, and every refusal
//! with what it says.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{App, Cli, Wasmform};

const APP: &str = "web: {guests}/hello.wasm\n";
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Writes `text` to `dir/name` with mode 0600.
fn secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A self-signed certificate for 127.0.0.1: (certificate, key) PEM files in `dir`.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    (
        secret(dir, &format!("{name}.crt"), &made.cert.pem()),
        secret(
            dir,
            &format!("{name}.key"),
            &made.signing_key.serialize_pem(),
        ),
    )
}

/// Runs a client command from a directory that is not the app's, as an operator's laptop
/// would.
fn client(args: &[&str]) -> Cli {
    let elsewhere = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wasmform"))
        .args(args)
        .current_dir(elsewhere.path())
        .env("RUST_BACKTRACE", "0")
        .env_remove("WASMFORM_REMOTE")
        .env_remove("WASMFORM_TOKEN_FILE")
        .env_remove("WASMFORM_REMOTE_CERT")
        .output()
        .unwrap();
    Cli::from(output)
}

/// A host serving its control API over HTTPS with `cert`: (host, its control URL).
fn tls_host(app: &App, token: &Path, cert: &Path, key: &Path) -> (Wasmform, String) {
    let host = app.up(&[
        "--control-tcp",
        "127.0.0.1:0",
        "--control-token-file",
        token.to_str().unwrap(),
        "--control-tls-cert",
        cert.to_str().unwrap(),
        "--control-tls-key",
        key.to_str().unwrap(),
    ]);
    let addr = host.logged_url_addr("control API on", "https");
    (host, format!("https://{addr}"))
}

#[test]
fn remote_commands_reach_a_host_over_tls_with_a_pinned_certificate() {
    let app = App::new(APP);
    let keys = tempfile::tempdir().unwrap();
    let token = secret(keys.path(), "token", &format!("{TOKEN}\n"));
    let (cert, key) = self_signed(keys.path(), "node");
    let (host, url) = tls_host(&app, &token, &cert, &key);
    let remote = |args: &[&str], token: &Path, cert: &Path| {
        let mut all = args.to_vec();
        all.extend([
            "--remote",
            &url,
            "--token-file",
            token.to_str().unwrap(),
            "--remote-cert",
            cert.to_str().unwrap(),
        ]);
        client(&all)
    };

    let ps = remote(&["ps"], &token, &cert);
    assert!(ps.ok, "{ps:?}");
    assert!(ps.stdout.contains("web.1"), "{ps:?}");
    let scaled = remote(&["scale", "web=2"], &token, &cert);
    assert!(scaled.ok, "{scaled:?}");
    assert_eq!(app.formation(), vec![("web".to_string(), 2)]);

    // A wrong token: refused, and the log names the peer but never the token.
    let wrong = secret(keys.path(), "wrong", "not-the-token-but-long-enough\n");
    let refused = remote(&["ps"], &wrong, &cert);
    assert!(!refused.ok);
    assert!(
        refused
            .stderr
            .contains(&format!("the host at {url} refused the token in")),
        "{refused:?}"
    );
    let out = host.wait_for("wrong bearer token (401)", Duration::from_secs(5));
    assert!(out.contains("refused GET /v1/ps from 127.0.0.1:"), "{out}");
    assert!(!out.contains("not-the-token-but-long-enough"), "{out}");

    // A certificate the client did not pin: no request is sent.
    let (other, _) = self_signed(keys.path(), "other");
    let unpinned = remote(&["ps"], &token, &other);
    assert!(!unpinned.ok);
    assert!(
        unpinned.stderr.contains(&format!(
            "TLS with the host at {url} failed (is `--remote-cert` its certificate or its CA?)"
        )),
        "{unpinned:?}"
    );
    host.wait_for("TLS handshake with 127.0.0.1:", Duration::from_secs(5));

    // The token rotates without a restart: the old one stops working, the new one works.
    let rotated = "fedcba9876543210fedcba9876543210";
    let old = secret(keys.path(), "old", &format!("{TOKEN}\n"));
    let staged = secret(keys.path(), "token.new", &format!("{rotated}\n"));
    std::fs::rename(staged, &token).unwrap();
    assert!(!remote(&["ps"], &old, &cert).ok);
    let ps = remote(&["ps"], &token, &cert);
    assert!(ps.ok, "{ps:?}");

    // The same through the environment, as a CI job would set it.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wasmform"))
        .args(["scale", "web=1"])
        .current_dir(keys.path())
        .env("WASMFORM_REMOTE", &url)
        .env("WASMFORM_TOKEN_FILE", &token)
        .env("WASMFORM_REMOTE_CERT", &cert)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(app.formation(), vec![("web".to_string(), 1)]);
}

#[test]
fn a_certificate_signed_by_a_pinned_ca_is_trusted_for_its_name() {
    let keys = tempfile::tempdir().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let node_key = rcgen::KeyPair::generate().unwrap();
    let node = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&node_key, &issuer)
        .unwrap();
    let ca_file = secret(keys.path(), "ca.crt", &ca.pem());
    let cert = secret(keys.path(), "node.crt", &node.pem());
    let key = secret(keys.path(), "node.key", &node_key.serialize_pem());
    let token = secret(keys.path(), "token", TOKEN);
    let app = App::new(APP);
    let (_host, url) = tls_host(&app, &token, &cert, &key);
    let ps = client(&[
        "ps",
        "--json",
        "--remote",
        &url,
        "--token-file",
        token.to_str().unwrap(),
        "--remote-cert",
        ca_file.to_str().unwrap(),
    ]);
    assert!(ps.ok, "{ps:?}");
    assert!(ps.stdout.contains("\"web.1\""), "{ps:?}");
}

#[test]
fn remote_settings_that_would_leak_the_token_or_cannot_work_are_refused() {
    let keys = tempfile::tempdir().unwrap();
    let token = secret(keys.path(), "token", TOKEN);
    let token = token.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "ps",
                "--remote",
                "http://10.1.2.3:7070",
                "--token-file",
                token,
            ],
            "--remote http://10.1.2.3:7070: plain http would send the token in clear text over the network: use https://",
        ),
        (
            vec![
                "ps",
                "--remote",
                "https://127.0.0.1:7070",
                "--token-file",
                token,
            ],
            "--remote https://127.0.0.1:7070: name the host's certificate, or the CA that signed it, with `--remote-cert FILE`",
        ),
        (
            vec![
                "ps",
                "--remote",
                "https://edge.example.net",
                "--token-file",
                token,
            ],
            "--remote https://edge.example.net: name the port of the host's `--control-tcp`",
        ),
        (
            vec!["scale", "web=2", "--remote", "http://127.0.0.1:7070"],
            "a remote host needs its bearer token: `--token-file FILE`",
        ),
        (
            vec![
                "ps",
                "--remote",
                "ftp://127.0.0.1:7070",
                "--token-file",
                token,
            ],
            "unknown scheme `ftp`",
        ),
        (
            vec![
                "down",
                "--purge",
                "--remote",
                "http://127.0.0.1:7070",
                "--token-file",
                token,
            ],
            "--purge removes this machine's state directory, not a remote host's",
        ),
    ] {
        let out = client(&args);
        assert!(!out.ok, "{args:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
    // Nothing listens there: the client says where it tried.
    let out = client(&[
        "ps",
        "--remote",
        "http://127.0.0.1:9",
        "--token-file",
        token,
    ]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("cannot reach the host at http://127.0.0.1:9"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_host_refuses_clear_text_off_loopback_and_bad_certificate_files() {
    let app = App::new(APP);
    let keys = tempfile::tempdir().unwrap();
    let token = secret(keys.path(), "token", TOKEN);
    let token = token.to_str().unwrap();
    let (cert, key) = self_signed(keys.path(), "node");
    let (other_cert, _) = self_signed(keys.path(), "other");
    let empty = secret(keys.path(), "empty.crt", "");
    let tls = |cert: &Path, key: &Path| {
        app.up_fails(&[
            "--control-tcp",
            "127.0.0.1:0",
            "--control-token-file",
            token,
            "--control-tls-cert",
            cert.to_str().unwrap(),
            "--control-tls-key",
            key.to_str().unwrap(),
        ])
    };
    let out = app.up_fails(&["--control-tcp", "0.0.0.0:0", "--control-token-file", token]);
    assert!(
        out.contains("--control-tcp 0.0.0.0:0: not a loopback address, and the bearer token must not cross the network in clear text: give the host a certificate with `--control-tls-cert FILE --control-tls-key FILE`"),
        "{out}"
    );
    let out = tls(&empty, &key);
    assert!(
        out.contains(&format!(
            "--control-tls-cert `{}`: holds no certificate",
            empty.display()
        )),
        "{out}"
    );
    let out = tls(&other_cert, &key);
    assert!(
        out.contains(&format!(
            "--control-tls-key `{}` does not go with --control-tls-cert `{}`",
            key.display(),
            other_cert.display()
        )),
        "{out}"
    );
    let out = tls(&cert, &cert);
    assert!(out.contains("not a PEM private key file"), "{out}");
}

/// A host of `web: app.wasm` (hello) with its control API on loopback TCP: (host, app, the
/// `--remote` arguments).
fn plain_host(extra: &[&str]) -> (Wasmform, App, tempfile::TempDir, Vec<String>) {
    let app = App::new("web: app.wasm\n");
    app.install("hello.wasm", "app.wasm");
    let keys = tempfile::tempdir().unwrap();
    let token = secret(keys.path(), "token", TOKEN);
    let mut args = vec![
        "-m",
        "web=4",
        "--control-tcp",
        "127.0.0.1:0",
        "--control-token-file",
        token.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let host = app.up(&args);
    let addr = host.logged_addr("control API on");
    let remote = vec![
        "--remote".to_string(),
        format!("http://{addr}"),
        "--token-file".to_string(),
        token.display().to_string(),
    ];
    (host, app, keys, remote)
}

#[test]
fn a_remote_deploy_uploads_the_app_and_switches_under_load_without_a_failed_request() {
    let (host, app, _keys, remote) = plain_host(&[]);
    // The operator's copy of the app, elsewhere, with a new component.
    let laptop = App::new("web: build/app.wasm\n");
    std::fs::create_dir(laptop.path("build")).unwrap();
    std::fs::copy(
        crate::support::guest("test_web.wasm"),
        laptop.path("build/app.wasm"),
    )
    .unwrap();
    laptop.write(".env", "GREETING=hi\n");

    let load = crate::support::Load::start(host.addr(), "/", 16);
    std::thread::sleep(Duration::from_millis(300));
    let mut args = vec!["deploy"];
    args.extend(remote.iter().map(String::as_str));
    let out = laptop.cli(&args);
    assert!(out.ok, "{out:?}");
    assert!(out.stderr.contains("uploading 3 files"), "{out:?}");
    assert_eq!(out.stdout.trim(), "Released v2: Deploy: web changed");
    for _ in 0..10 {
        let body = host.get("/").body;
        assert!(body.starts_with("test-web web."), "{body}");
    }
    let answers = load.stop();
    assert!(answers.len() > 50, "too little load: {}", answers.len());
    let failed: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "{failed:?}");
    // The node's files are the uploaded ones: a restart or a local deploy keeps v2.
    assert_eq!(
        std::fs::read(app.path("Procfile")).unwrap(),
        b"web: build/app.wasm\n"
    );
    assert_eq!(
        std::fs::read_to_string(app.path(".env")).unwrap(),
        "GREETING=hi\n"
    );
    let again = app.cli(&["deploy"]);
    assert!(again.stdout.contains("nothing changed: v2"), "{again:?}");
    // No staging directory is left behind.
    let left: Vec<_> = std::fs::read_dir(app.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".wasmform-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_remote_deploy_that_fails_or_is_cut_off_changes_nothing() {
    let (host, app, _keys, remote) = plain_host(&["--max-component-size", "200KiB"]);
    let deploy = |laptop: &App| {
        let mut args = vec!["deploy"];
        args.extend(remote.iter().map(String::as_str));
        laptop.cli(&args)
    };
    let unchanged = |app: &App| {
        assert_eq!(
            std::fs::read(app.path("Procfile")).unwrap(),
            b"web: app.wasm\n"
        );
        assert_eq!(
            std::fs::read(app.path("app.wasm")).unwrap(),
            std::fs::read(crate::support::guest("hello.wasm")).unwrap()
        );
        assert!(host.get("/").body.starts_with("hello from web."));
    };

    // A component that does not compile: the deploy exits 1 with the reason, the node keeps
    // serving, and its files are put back.
    let broken = App::new("web: app.wasm\n");
    broken.write("app.wasm", "not wasm at all");
    let out = deploy(&broken);
    assert!(!out.ok, "{out:?}");
    assert!(out.stderr.contains("app.wasm"), "{out:?}");
    unchanged(&app);

    // Over the host's --max-component-size: 413, from the header alone.
    let big = App::new("web: app.wasm\n");
    std::fs::write(big.path("app.wasm"), vec![0u8; 300 * 1024]).unwrap();
    let out = deploy(&big);
    assert!(!out.ok, "{out:?}");
    assert!(
        out.stderr
            .contains("`app.wasm` is 307200 bytes, over this host's --max-component-size 200 KiB"),
        "{out:?}"
    );
    unchanged(&app);

    // A component outside the app directory cannot be sent.
    let outside = App::new(&format!(
        "web: {}\n",
        crate::support::guest("test_web.wasm").display()
    ));
    let out = deploy(&outside);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("is outside the app directory"),
        "{out:?}"
    );

    // Cut off in the middle, and corrupted: refused, nothing changed.
    let addr: std::net::SocketAddr = remote[1].trim_start_matches("http://").parse().unwrap();
    let header = |sha: &str| {
        format!("{{\"files\":[{{\"path\":\"Procfile\",\"size\":18,\"sha256\":\"{sha}\"}}]}}\n")
    };
    let send = |body: &str, length: usize, cut: bool| {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "POST /v1/deploy/upload HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n{body}"
        )
        .unwrap();
        if cut {
            stream.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut answer = String::new();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    let zeros = "0".repeat(64);
    let body = format!("{}web: build/x.wasm\n", header(&zeros));
    let cut = send(&body[..body.len() - 5], body.len(), true);
    assert!(cut.is_empty() || cut.starts_with("HTTP/1.1 400"), "{cut}");
    let corrupt = send(&body, body.len(), false);
    assert!(corrupt.starts_with("HTTP/1.1 400"), "{corrupt}");
    assert!(
        corrupt.contains("the upload was corrupted; nothing was changed"),
        "{corrupt}"
    );
    let escape = "{\"files\":[{\"path\":\"../x\",\"size\":0,\"sha256\":\"\"}]}\n";
    let escaped = send(escape, escape.len(), false);
    assert!(
        escaped.contains("must be relative to the app directory, without `..`"),
        "{escaped}"
    );
    unchanged(&app);
}

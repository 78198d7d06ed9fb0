//! A direct QEMU-to-QEMU live migration over a local unix socket while the
//! memtest guest dirties pages; the guest's own check on the target proves
//! memory moved intact. Speaks just enough QMP inline (the agent's client
//! lives elsewhere).

mod guest_support;

use std::path::Path;
use std::time::Duration;

use ferry::agent::guest::{DirtyRate, GuestConfig};
use guest_support::{Rig, socket_uri};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Minimal QMP: greeting, `qmp_capabilities`, then one command at a time.
struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    async fn connect(path: &Path) -> Qmp {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    panic!("QMP {}: {e}", path.display())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (reader, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(reader),
            writer,
        };
        let greeting = qmp.read().await;
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", json!({})).await;
        qmp
    }

    async fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), self.reader.read_line(&mut line))
            .await
            .expect("QMP reply within 30 s")
            .unwrap();
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap()
    }

    /// Runs a command and returns its `return` value, skipping events.
    async fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let request = json!({ "execute": command, "arguments": arguments });
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .await
            .unwrap();
        loop {
            let reply = self.read().await;
            if let Some(ret) = reply.get("return") {
                return ret.clone();
            }
            if let Some(error) = reply.get("error") {
                panic!("QMP {command} failed: {error}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_memory_survives_a_live_migration_while_dirtying() {
    let rig = Rig::new();
    // Identical -kernel and -append on both sides (the multiboot option ROM
    // is a RAM block). Default fill: most of the 128 MiB, non-zero.
    let config = GuestConfig {
        fill_mib: None,
        rate: DirtyRate::MibPerSec(64),
    };
    let source = rig.spawn("src", &config, &[]);
    // The target host installs the kernel in its own directory: the content
    // and -append must match, the path need not.
    let dst_kernel = ferry::agent::guest::install_kernel(&rig.path("dst-host")).unwrap();
    assert_ne!(dst_kernel, rig.kernel);
    let target = rig.spawn_with_kernel("dst", &dst_kernel, &config, &["-incoming", "defer"]);

    let mut src_console = source.console().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = src_console.status().await.unwrap();
    assert_eq!(before.rate, DirtyRate::MibPerSec(64));
    assert!(
        before.writes > 0,
        "the guest dirties before the migration starts: {before:?}"
    );

    let mut src_qmp = Qmp::connect(&source.qmp).await;
    let mut dst_qmp = Qmp::connect(&target.qmp).await;
    let migration_socket = rig.path("migration.sock");
    dst_qmp
        .execute(
            "migrate-incoming",
            json!({ "uri": socket_uri(&migration_socket) }),
        )
        .await;
    // Above QEMU's 128 MiB/s default so the test is quick, and a short
    // downtime limit so most pages move while the guest runs and dirties:
    // with the 300 ms default QEMU would switch over with most RAM unsent.
    src_qmp
        .execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 512u64 << 20, "downtime-limit": 20 }),
        )
        .await;
    src_qmp
        .execute("migrate", json!({ "uri": socket_uri(&migration_socket) }))
        .await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let info = loop {
        let info = src_qmp.execute("query-migrate", json!({})).await;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed" | "cancelled") => {
                panic!("migration failed: {info}\nsource: {}", source.log_text())
            }
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "migration did not finish: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("migration: {info}");
    let transferred = info["ram"]["transferred"].as_u64().unwrap();
    assert!(
        transferred > u64::from(before.pages) * 4096,
        "non-zero pages were sent: {info}"
    );
    let sent = info["ram"]["normal"].as_u64().unwrap() + info["ram"]["duplicate"].as_u64().unwrap();
    let ram_pages = info["ram"]["total"].as_u64().unwrap() / 4096;
    assert!(
        sent > ram_pages,
        "pages dirtied during the migration were sent again: {info}"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = dst_qmp.execute("query-status", json!({})).await;
        if status["status"] == "running" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "target never ran: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The same guest, now on the target: it kept its state and its memory.
    let mut dst_console = target.console().await;
    let after = dst_console.status().await.unwrap();
    assert_eq!(after.pages, before.pages);
    assert_eq!(
        after.rate,
        DirtyRate::MibPerSec(64),
        "the dirtier's state migrated"
    );
    assert!(
        after.writes > before.writes,
        "dirtying continued through the migration: {before:?} -> {after:?}"
    );
    assert!(after.ticks > before.ticks, "uptime carried over");
    let report = dst_console.verify().await.unwrap();
    assert!(
        report.is_intact(),
        "memory damaged by the migration: {report:?}"
    );

    // And it keeps running correctly there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = dst_console.status().await.unwrap();
    assert!(
        later.writes > after.writes,
        "the guest dirties on the target: {later:?}"
    );
    assert!(dst_console.verify().await.unwrap().is_intact());
}

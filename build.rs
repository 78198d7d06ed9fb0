//! Builds the memtest guest kernel (`guest/memtest/`) into `OUT_DIR`.
//!
//! Every Ferry binary embeds the kernel (`ferry::agent::guest::MEMTEST_KERNEL`),
//! so it is compiled here from the C and assembly sources in the repository
//! with the Debian toolchain: `gcc -m32 -ffreestanding` and `ld -m elf_i386`.
//! No multilib packages are needed because the guest avoids libgcc (no
//! 64-bit division, no floating point). `FERRY_GUEST_CC` and `FERRY_GUEST_LD`
//! override the tools.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCES: &[&str] = &["boot.S", "memtest.c"];
const LINKER_SCRIPT: &str = "link.ld";

/// Flags for a freestanding i686 kernel that never calls into libgcc.
const CFLAGS: &[&str] = &[
    "-m32",
    "-march=i686",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    // Stops gcc turning the pattern loops into memset/memcpy calls.
    "-fno-tree-loop-distribute-patterns",
    "-mgeneral-regs-only",
    "-O2",
    "-Wall",
    "-Wextra",
];

fn main() {
    let src =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("guest/memtest");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", src.display());
    for name in SOURCES.iter().chain([&LINKER_SCRIPT]) {
        println!("cargo:rerun-if-changed={}", src.join(name).display());
    }
    println!("cargo:rerun-if-env-changed=FERRY_GUEST_CC");
    println!("cargo:rerun-if-env-changed=FERRY_GUEST_LD");

    let cc = env::var("FERRY_GUEST_CC").unwrap_or_else(|_| "gcc".to_owned());
    let ld = env::var("FERRY_GUEST_LD").unwrap_or_else(|_| "ld".to_owned());

    let mut objects = Vec::new();
    for name in SOURCES {
        let object = out.join(format!("{name}.o"));
        let mut cmd = Command::new(&cc);
        cmd.args(CFLAGS)
            .arg("-c")
            .arg(src.join(name))
            .arg("-o")
            .arg(&object);
        run(
            &mut cmd,
            &cc,
            "gcc with -m32 support (Debian package `gcc`)",
        );
        objects.push(object);
    }

    let kernel = out.join("memtest.elf");
    let mut cmd = Command::new(&ld);
    cmd.args([
        "-m",
        "elf_i386",
        "-nostdlib",
        "--build-id=none",
        "-z",
        "max-page-size=0x1000",
    ])
    .arg("-T")
    .arg(src.join(LINKER_SCRIPT))
    .arg("-o")
    .arg(&kernel)
    .args(&objects);
    run(
        &mut cmd,
        &ld,
        "GNU ld with the elf_i386 emulation (Debian package `binutils`)",
    );
    check_elf32(&kernel);
}

/// Runs one toolchain step; on failure stops the build naming what is missing.
fn run(cmd: &mut Command, tool: &str, needs: &str) {
    match cmd.output() {
        Err(e) => fail(&format!(
            "cannot run `{tool}` ({e}); the memtest guest kernel needs {needs}"
        )),
        Ok(output) if !output.status.success() => fail(&format!(
            "`{cmd:?}` failed ({}); the memtest guest kernel needs {needs}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        )),
        Ok(_) => {}
    }
}

/// QEMU's `-kernel` only takes a 32-bit multiboot ELF; catch anything else here.
fn check_elf32(kernel: &Path) {
    match std::fs::read(kernel) {
        Ok(bytes) if bytes.len() > 5 && bytes[..4] == *b"\x7fELF" && bytes[4] == 1 => {}
        Ok(_) => fail(&format!("{} is not a 32-bit ELF", kernel.display())),
        Err(e) => fail(&format!("cannot read {}: {e}", kernel.display())),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: building the memtest guest kernel: {message}");
    std::process::exit(1);
}

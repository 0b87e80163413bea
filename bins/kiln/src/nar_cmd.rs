//! `kiln nar …`: write, restore and list NAR archives, as `nix-store --dump`,
//! `nix-store --restore` and `nix nar ls` do.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use kiln_formats::nar::{self, ListNode};

#[derive(Debug, clap::Args)]
pub struct NarArgs {
    #[command(subcommand)]
    command: NarCommand,
}

#[derive(Debug, Subcommand)]
enum NarCommand {
    /// Write the NAR serialisation of PATH to standard output (like `nix-store --dump`).
    Dump {
        /// File, symlink or directory to serialise; a symlink is archived itself, not followed.
        path: PathBuf,
    },
    /// Rebuild the tree held by a NAR on standard input at DIR (like `nix-store --restore`).
    Restore {
        /// Where to create the tree; must not exist yet.
        dir: PathBuf,
    },
    /// List the contents of a NAR file (like `nix nar ls`).
    Ls {
        /// The NAR file.
        nar: PathBuf,
        /// Path inside the archive to list.
        #[arg(default_value = "/")]
        path: String,
        /// Print the listing as JSON, as `nix nar ls --json` does.
        #[arg(long)]
        json: bool,
        /// List subdirectories recursively.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// Show file type, permissions, size and symlink targets.
        #[arg(short = 'l', long)]
        long: bool,
        /// Show a directory itself rather than its contents.
        #[arg(short = 'd', long)]
        directory: bool,
    },
}

pub fn run(args: NarArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        NarCommand::Dump { path } => {
            // Straight to the file descriptor: the NAR arrives in large
            // writes, and stdout's line buffering would only scan them for
            // newlines.
            let stdout = File::from(io::stdout().as_fd().try_clone_to_owned()?);
            nar::dump_path(&path, stdout)?;
        }
        NarCommand::Restore { dir } => {
            let stdin = File::from(io::stdin().as_fd().try_clone_to_owned()?);
            nar::restore(stdin, &dir)?;
        }
        NarCommand::Ls {
            nar,
            path,
            json,
            recursive,
            long,
            directory,
        } => {
            let file =
                File::open(&nar).with_context(|| format!("cannot open '{}'", nar.display()))?;
            let listing =
                nar::list(file).with_context(|| format!("cannot read '{}'", nar.display()))?;
            let node = listing
                .get(path.as_bytes())
                .with_context(|| format!("path '{path}' does not exist in '{}'", nar.display()))?;
            let mut out = io::stdout().lock();
            if json {
                // Like Nix 2.8: no newline after the JSON, names as raw bytes.
                let mut text = Vec::new();
                write_json(&mut text, node, recursive);
                out.write_all(&text)?;
            } else {
                let options = TextOptions { recursive, long };
                let (rel, show_directory) = match node {
                    ListNode::Directory { .. } => (b".".to_vec(), directory),
                    _ => (base_name(path.as_bytes()).to_vec(), false),
                };
                list_text(&mut out, node, &rel, show_directory, options)?;
            }
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn base_name(path: &[u8]) -> &[u8] {
    let trimmed = path.strip_suffix(b"/").unwrap_or(path);
    trimmed.rsplit(|&b| b == b'/').next().unwrap_or(b"")
}

#[derive(Debug, Clone, Copy)]
struct TextOptions {
    recursive: bool,
    long: bool,
}

/// Prints a node the way `nix nar ls` does: a directory's entries (all the
/// way down with `-R`) relative to `.`, or the node itself.
fn list_text(
    out: &mut impl Write,
    node: &ListNode,
    rel: &[u8],
    show_directory: bool,
    options: TextOptions,
) -> io::Result<()> {
    match node {
        ListNode::Directory { entries } if !show_directory => {
            for (name, child) in entries {
                let child_rel = [rel, b"/", name].concat();
                show_line(out, child, &child_rel, options)?;
                if options.recursive && matches!(child, ListNode::Directory { .. }) {
                    list_text(out, child, &child_rel, false, options)?;
                }
            }
            Ok(())
        }
        _ => show_line(out, node, rel, options),
    }
}

fn show_line(
    out: &mut impl Write,
    node: &ListNode,
    rel: &[u8],
    options: TextOptions,
) -> io::Result<()> {
    if options.long {
        // A NAR keeps no owners or timestamps: modes are those of a store path.
        let (mode, size) = match node {
            ListNode::Regular {
                size,
                executable: true,
                ..
            } => ("-r-xr-xr-x", *size),
            ListNode::Regular { size, .. } => ("-r--r--r--", *size),
            ListNode::Symlink { .. } => ("lrwxrwxrwx", 0),
            ListNode::Directory { .. } => ("dr-xr-xr-x", 0),
        };
        write!(out, "{mode} {size:>20} ")?;
    }
    out.write_all(rel)?;
    if let (true, ListNode::Symlink { target }) = (options.long, node) {
        out.write_all(b" -> ")?;
        out.write_all(target)?;
    }
    writeln!(out)
}

/// Appends the JSON that `nix nar ls --json` prints, with its key order.
/// Without `recursive`, a directory's entries are named but not described.
fn write_json(out: &mut Vec<u8>, node: &ListNode, recursive: bool) {
    match node {
        ListNode::Regular {
            size,
            executable,
            nar_offset,
        } => {
            write!(out, r#"{{"type":"regular","size":{size}"#).unwrap();
            if *executable {
                out.extend_from_slice(br#","executable":true"#);
            }
            write!(out, r#","narOffset":{nar_offset}}}"#).unwrap();
        }
        ListNode::Symlink { target } => {
            out.extend_from_slice(br#"{"type":"symlink","target":"#);
            json_string(out, target);
            out.push(b'}');
        }
        ListNode::Directory { entries } => {
            out.extend_from_slice(br#"{"type":"directory","entries":{"#);
            for (i, (name, child)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_string(out, name);
                out.push(b':');
                if recursive {
                    write_json(out, child, true);
                } else {
                    out.extend_from_slice(b"{}");
                }
            }
            out.extend_from_slice(b"}}");
        }
    }
}

/// A JSON string as Nix 2.8 writes it: bytes other than quotes, backslashes
/// and control characters pass through unchanged, even if not UTF-8.
fn json_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    for &b in bytes {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..0x20 => write!(out, "\\u{b:04x}").unwrap(),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

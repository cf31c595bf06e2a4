//! `blockdelta info`: what `qemu-img info` shows, with the same JSON keys.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use qcow2::bitmaps::{self, BitmapsExtension};
use qcow2::header::{
    AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD, EXT_BITMAPS, Header,
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTENDED_L2, MAGIC,
};
use qcow2::storage::{FileOptions, FileStorage, Locking, Storage};
use serde_json::{Value, json};

use super::Output;

/// Deepest chain `--backing-chain` follows.
const MAX_CHAIN: usize = 64;

/// One image of a chain, described.
struct ImageInfo {
    json: Value,
    /// The backing file to describe next, with `--backing-chain`.
    backing: Option<PathBuf>,
}

pub fn run(
    image: &Path,
    output: Output,
    backing_chain: bool,
    force_share: bool,
) -> anyhow::Result<()> {
    let mut infos = vec![describe(image, force_share)?];
    if backing_chain {
        while let Some(next) = infos.last().and_then(|i| i.backing.clone()) {
            if infos.len() >= MAX_CHAIN {
                bail!(
                    "the backing chain of '{}' is deeper than {MAX_CHAIN} images",
                    image.display()
                );
            }
            infos.push(describe(&next, force_share)?);
        }
    }
    match output {
        Output::Json if backing_chain => {
            let all: Vec<Value> = infos.into_iter().map(|i| i.json).collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(&infos[0].json)?),
        Output::Human => {
            let texts: Vec<String> = infos.iter().map(|i| human(&i.json)).collect();
            print!("{}", texts.join("\n"));
        }
    }
    Ok(())
}

/// QEMU's `path_combine`: a relative backing name is relative to the image's directory
/// (as the image's path was given).
fn combine(image: &Path, backing: &str) -> PathBuf {
    let backing = Path::new(backing);
    match image.parent() {
        Some(dir) if backing.is_relative() => dir.join(backing),
        _ => backing.to_path_buf(),
    }
}

fn open(path: &Path, force_share: bool) -> anyhow::Result<FileStorage> {
    let locking = if force_share { Locking::ForceShare } else { Locking::Auto };
    FileOptions::new()
        .locking(locking)
        .open(path)
        .with_context(|| format!("Could not open '{}'", path.display()))
}

fn describe(path: &Path, force_share: bool) -> anyhow::Result<ImageInfo> {
    let storage = open(path, force_share)?;
    let file_len = storage.len()?;
    let actual_size = std::fs::metadata(path)?.blocks() * 512;
    let filename = path.display().to_string();
    let file_child = json!({
        "name": "file",
        "info": {
            "children": [],
            // QEMU's file driver reports lengths in whole sectors.
            "virtual-size": file_len.next_multiple_of(512),
            "filename": filename,
            "format": "file",
            "actual-size": actual_size,
            "format-specific": {"type": "file", "data": {}},
            "dirty-flag": false,
        }
    });
    let mut magic = [0u8; 4];
    storage.read_at(&mut magic, 0)?;
    if file_len < 4 || u32::from_be_bytes(magic) != MAGIC {
        let json = json!({
            "children": [file_child],
            "virtual-size": file_len.next_multiple_of(512),
            "filename": filename,
            "format": "raw",
            "actual-size": actual_size,
            "dirty-flag": false,
        });
        return Ok(ImageInfo { json, backing: None });
    }
    let header = qcow2::image::read_header(&storage, file_len)
        .with_context(|| format!("Could not open '{filename}'"))?;
    let mut json = json!({
        "children": [file_child],
        "virtual-size": header.size,
        "filename": filename,
        "cluster-size": header.cluster_size(),
        "format": "qcow2",
        "actual-size": actual_size,
        "format-specific": {"type": "qcow2", "data": format_specific(&storage, &header, &filename)?},
        "dirty-flag": header.incompatible_features & INCOMPAT_DIRTY != 0,
    });
    let mut backing = None;
    if let Some(name) = &header.backing_file {
        let name = String::from_utf8_lossy(name).into_owned();
        let full = combine(path, &name);
        json["backing-filename"] = json!(name);
        json["full-backing-filename"] = json!(full.display().to_string());
        if let Some(format) = header.backing_format() {
            json["backing-filename-format"] = json!(format);
        }
        backing = Some(full);
    }
    Ok(ImageInfo { json, backing })
}

fn format_specific(
    storage: &dyn Storage,
    header: &Header,
    filename: &str,
) -> anyhow::Result<Value> {
    let compression = if header.compression_type == COMPRESSION_ZSTD { "zstd" } else { "zlib" };
    if header.version < 3 {
        return Ok(json!({
            "compat": "0.10",
            "compression-type": compression,
            "refcount-bits": header.refcount_bits(),
        }));
    }
    let mut data = json!({
        "compat": "1.1",
        "compression-type": compression,
        "lazy-refcounts": header.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
        "refcount-bits": header.refcount_bits(),
        "corrupt": header.incompatible_features & INCOMPAT_CORRUPT != 0,
        "extended-l2": header.incompatible_features & INCOMPAT_EXTENDED_L2 != 0,
    });
    if let Some(ext) = header.extension(EXT_BITMAPS)
        && header.autoclear_features & AUTOCLEAR_BITMAPS != 0
    {
        let cluster_size = header.cluster_size();
        let ext = BitmapsExtension::parse(ext, cluster_size)
            .with_context(|| format!("Could not read the bitmaps of '{filename}'"))?;
        let entries = bitmaps::read_directory(storage, &ext, cluster_size, header.size)
            .with_context(|| format!("Could not read the bitmaps of '{filename}'"))?;
        data["bitmaps"] = blockdelta::block::qcow2::bitmap_info_list(&entries);
    }
    Ok(data)
}

/// Sizes as `qemu-img` prints them: in the largest binary unit in which the number is
/// below 1000, with three significant digits.
pub fn size_to_str(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let scaled = bytes as f64 * 1024.0 / 1000.0;
    let unit = if bytes == 0 { 0 } else { (scaled.log2().floor() as usize) / 10 };
    let value = bytes as f64 / (1u64 << (10 * unit)) as f64;
    let decimals = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else if value >= 1.0 {
        2
    } else {
        3
    };
    let mut text = format!("{value:.decimals$}");
    if text.contains('.') {
        text = text.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{text} {}", UNITS[unit.min(UNITS.len() - 1)])
}

/// The human form, as `qemu-img info` prints it.
fn human(info: &Value) -> String {
    let mut out = String::new();
    let num = |v: &Value| v.as_u64().unwrap_or(0);
    out += &format!("image: {}\n", info["filename"].as_str().unwrap_or(""));
    out += &format!("file format: {}\n", info["format"].as_str().unwrap_or(""));
    let size = num(&info["virtual-size"]);
    out += &format!("virtual size: {} ({size} bytes)\n", size_to_str(size));
    out += &format!("disk size: {}\n", size_to_str(num(&info["actual-size"])));
    if let Some(cluster) = info["cluster-size"].as_u64() {
        out += &format!("cluster_size: {cluster}\n");
    }
    if let Some(backing) = info["backing-filename"].as_str() {
        out += &format!("backing file: {backing}");
        match info["full-backing-filename"].as_str() {
            Some(full) if full != backing => out += &format!(" (actual path: {full})\n"),
            _ => out += "\n",
        }
    }
    if let Some(format) = info["backing-filename-format"].as_str() {
        out += &format!("backing file format: {format}\n");
    }
    let data = &info["format-specific"]["data"];
    if data.is_object() {
        out += "Format specific information:\n";
        let line = |key: &str, label: &str, out: &mut String| {
            if let Some(v) = data.get(key) {
                let text = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
                *out += &format!("    {label}: {text}\n");
            }
        };
        line("compat", "compat", &mut out);
        line("compression-type", "compression type", &mut out);
        line("lazy-refcounts", "lazy refcounts", &mut out);
        if let Some(list) = data["bitmaps"].as_array() {
            out += "    bitmaps:\n";
            for (i, b) in list.iter().enumerate() {
                out += &format!("        [{i}]:\n            flags:\n");
                for (j, flag) in b["flags"].as_array().into_iter().flatten().enumerate() {
                    out += &format!("                [{j}]: {}\n", flag.as_str().unwrap_or(""));
                }
                out += &format!("            name: {}\n", b["name"].as_str().unwrap_or(""));
                out += &format!("            granularity: {}\n", num(&b["granularity"]));
            }
        }
        line("refcount-bits", "refcount bits", &mut out);
        line("corrupt", "corrupt", &mut out);
        line("extended-l2", "extended l2", &mut out);
    }
    let file = &info["children"][0]["info"];
    out += "Child node '/file':\n";
    out += &format!("    filename: {}\n", file["filename"].as_str().unwrap_or(""));
    out += "    protocol type: file\n";
    let len = num(&file["virtual-size"]);
    out += &format!("    file length: {} ({len} bytes)\n", size_to_str(len));
    out += &format!("    disk size: {}\n", size_to_str(num(&file["actual-size"])));
    out
}

#[cfg(test)]
mod tests {
    use super::size_to_str;

    #[test]
    fn sizes_print_like_qemu() {
        for (bytes, text) in [
            (1024, "1 KiB"),
            (1536, "1.5 KiB"),
            (1048064, "1 MiB"),
            (10485760, "10 MiB"),
            (123457024, "118 MiB"),
            (208896, "204 KiB"),
            (328192, "320 KiB"),
            (590336, "576 KiB"),
            (0, "0 B"),
            (67108864, "64 MiB"),
        ] {
            assert_eq!(size_to_str(bytes), text, "{bytes}");
        }
    }
}

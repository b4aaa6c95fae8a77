//! The demo's container image, built from the running `uplink` binary: the
//! executable, the shared libraries it has loaded and its ELF interpreter,
//! imported into the local Docker engine as `uplink-demo:<version>-<hash
//! of the executable>`. No registry is needed, so the demo runs a
//! container on any machine with a Docker engine.

use std::io::Read;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::CreateImageOptions;
use futures_util::StreamExt;

/// The image's repository.
pub const REPO: &str = "uplink-demo";

/// The image's tag for this executable: its version and the start of
/// the SHA-256 of its bytes, so a rebuilt binary gets a fresh image.
fn tag() -> Result<String, String> {
    let exe =
        std::fs::read("/proc/self/exe").map_err(|e| format!("cannot read this executable: {e}"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &exe);
    let hex: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("{}-{hex}", crate::VERSION))
}

/// The path of the ELF interpreter (`PT_INTERP`) of the executable at
/// `exe`; None for a static executable or a file that is not 64-bit ELF.
fn interpreter(exe: &Path) -> Option<PathBuf> {
    let mut f = std::fs::File::open(exe).ok()?;
    let mut elf = Vec::new();
    f.by_ref().take(1 << 16).read_to_end(&mut elf).ok()?;
    if elf.get(..5)? != b"\x7fELF\x02" || elf.get(5)? != &1 {
        return None; // Not 64-bit little-endian ELF.
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == 3 {
            let off = u64_at(ph + 8)? as usize;
            let len = u64_at(ph + 32)? as usize;
            let mut file = std::fs::File::open(exe).ok()?;
            let mut all = Vec::new();
            file.read_to_end(&mut all).ok()?;
            let raw = all.get(off..off.checked_add(len)?)?;
            let s = std::str::from_utf8(raw).ok()?.trim_end_matches('\0');
            return Some(PathBuf::from(s));
        }
    }
    None
}

/// Shared objects mapped into this process.
fn loaded_libraries() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with('/') && p.contains(".so"))
        .map(PathBuf::from)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// A tar of the root file system: `/uplink`, its libraries, its
/// interpreter.
fn rootfs() -> Result<Vec<u8>, String> {
    let exe = std::fs::read_link("/proc/self/exe")
        .map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut files = vec![(exe.clone(), PathBuf::from("uplink"))];
    let mut paths = loaded_libraries();
    paths.extend(interpreter(&exe));
    for p in paths {
        let inside = p.strip_prefix("/").unwrap_or(&p).to_path_buf();
        if !files.iter().any(|(_, i)| *i == inside) {
            files.push((p, inside));
        }
    }
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(true);
    tar.sparse(false);
    for (from, inside) in files {
        let mut f = std::fs::File::open(&from)
            .map_err(|e| format!("cannot read {}: {e}", from.display()))?;
        tar.append_file(&inside, &mut f)
            .map_err(|e| format!("cannot pack {}: {e}", from.display()))?;
    }
    tar.into_inner()
        .map_err(|e| format!("cannot finish the image's tar: {e}"))
}

/// Makes sure the engine has this executable's image, importing it when
/// missing; returns its name.
pub async fn ensure(docker: &Docker) -> Result<String, String> {
    let tag = tokio::task::spawn_blocking(tag)
        .await
        .map_err(|e| format!("image tag task failed: {e}"))??;
    let image = format!("{REPO}:{tag}");
    if docker.inspect_image(&image).await.is_ok() {
        return Ok(image);
    }
    let tar = tokio::task::spawn_blocking(rootfs)
        .await
        .map_err(|e| format!("image build task failed: {e}"))??;
    let options = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(REPO.into()),
        tag: Some(tag),
        changes: vec!["ENTRYPOINT [\"/uplink\"]".into()],
        ..Default::default()
    };
    let mut progress =
        docker.create_image(Some(options), Some(bollard::body_full(tar.into())), None);
    while let Some(step) = progress.next().await {
        step.map_err(|e| format!("docker import of {image}: {e}"))?;
    }
    // Images of earlier builds are of no further use.
    let filters =
        std::collections::HashMap::from([("reference".to_string(), vec![REPO.to_string()])]);
    let listed = docker
        .list_images(Some(bollard::query_parameters::ListImagesOptions {
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap_or_default();
    for old in listed
        .iter()
        .flat_map(|i| &i.repo_tags)
        .filter(|t| **t != image)
    {
        let _ = docker
            .remove_image(
                old,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await;
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_executable_packs_with_its_libraries() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        if let Some(i) = interpreter(&exe) {
            assert!(i.is_absolute() && i.exists(), "{}", i.display());
        }
        assert!(loaded_libraries().iter().all(|l| l.is_absolute()));
        let tar = rootfs().unwrap();
        let mut names = Vec::new();
        let mut archive = tar::Archive::new(tar.as_slice());
        for e in archive.entries().unwrap() {
            names.push(e.unwrap().path().unwrap().display().to_string());
        }
        assert_eq!(names[0], "uplink");
        assert!(names.iter().any(|n| n.contains("libc.so")), "{names:?}");
    }

    #[test]
    fn files_that_are_not_elf_have_no_interpreter() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        assert_eq!(interpreter(&p), None);
        std::fs::write(&p, b"\x7fELF\x02\x01\x01").unwrap();
        assert_eq!(interpreter(&p), None);
    }
}

//! `toffee pairs merge` verifies every shard against its index before it writes anything: each
//! indexed record in its tar with every member once, and nothing else in the tar (issue 27).

use crate::common::{copy_tree, expect_error, stderr, toffee};
use std::path::Path;

/// Rewrites `tar` with `edit` applied to its (name, bytes) members.
fn rewrite(tar: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<u8>)>)) {
    let mut members = Vec::new();
    let mut ar = tar::Archive::new(std::fs::File::open(tar).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
        members.push((name, bytes));
    }
    edit(&mut members);
    let mut b = tar::Builder::new(std::fs::File::create(tar).unwrap());
    for (name, bytes) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    b.into_inner().unwrap();
}

#[test]
fn merge_refuses_damaged_shards_naming_shard_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = toffee(&["pairs", "--keep-rejected", "--out", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = toffee(&["pairs", "merge", run.to_str().unwrap()]);
    assert!(merged.status.success(), "{}", stderr(&merged));
    type Edit = fn(&mut Vec<(String, Vec<u8>)>);
    let cases: [(&str, Edit, &str); 3] = [
        (
            "missing member",
            |m| {
                let k = m0(m);
                m.retain(|(n, _)| !(n.starts_with(&k) && n.ends_with(".edit_mask.png")))
            },
            "has members",
        ),
        (
            "duplicated member",
            |m| {
                let first = m[0].clone();
                m.push(first);
            },
            "twice",
        ),
        (
            "foreign record",
            |m| {
                let k = m0(m);
                for (n, b) in m.clone().iter().filter(|(n, _)| n.starts_with(&k)) {
                    let rest = n.split_once('.').unwrap().1;
                    m.push((format!("ffffffffffffffff.{rest}"), b.clone()));
                }
            },
            "ffffffffffffffff",
        ),
    ];
    for (what, edit, want) in cases {
        let copy = dir.path().join(what.replace(' ', "-"));
        copy_tree(&run, &copy);
        rewrite(&copy.join("pairs-000000.tar"), edit);
        let e = expect_error(&toffee(&["pairs", "merge", copy.to_str().unwrap()]));
        assert!(
            e.contains("pairs-000000.tar") && e.contains(want),
            "{what}: {e}"
        );
    }
}

/// The key of the first member.
fn m0(m: &[(String, Vec<u8>)]) -> String {
    m[0].0.split_once('.').unwrap().0.to_string()
}

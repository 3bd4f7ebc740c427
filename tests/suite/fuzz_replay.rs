//! Deterministic replay of the fuzz corpus (seeds and anything the fuzzers
//! saved) through the same entry points the fuzz targets call.

use std::fs;

use rs_tests::repo_root;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = repo_root().join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        // A fuzzer running beside the tests may remove files as it minimises.
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        f(&data);
        // Every prefix and a few corruptions of each seed, too.
        for cut in (0..data.len()).step_by(data.len() / 16 + 1) {
            f(&data[..cut]);
            let mut bad = data.clone();
            bad[cut] ^= 0x5a;
            f(&bad);
        }
        n += 1;
    }
    assert!(n > 0, "no corpus in {}", dir.display());
}

#[test]
fn envelope_corpus() {
    replay("envelope", rs_protocol::fuzzing::envelope);
}

#[test]
fn xml_corpus() {
    replay("xml", rs_protocol::fuzzing::xml);
}

use std::time::Instant;
fn main() {
    use aes_gcm::{
        aead::{AeadInPlace, KeyInit},
        Aes256Gcm, Nonce,
    };
    let c = Aes256Gcm::new_from_slice(&[7u8; 32]).unwrap();
    let mut buf = vec![1u8; 65000];
    let n = 16 * 1024;
    let t = Instant::now();
    for i in 0..n {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&(i as u64).to_le_bytes());
        let _tag = c
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), b"", &mut buf)
            .unwrap();
    }
    let s = t.elapsed().as_secs_f64();
    println!("aes-gcm: {:.0} MB/s", (n * 65000) as f64 / s / 1e6);
    use sha2::Digest;
    let t = Instant::now();
    let mut h = sha2::Sha256::new();
    for _ in 0..n {
        h.update(&buf);
    }
    let _ = h.finalize();
    let s = t.elapsed().as_secs_f64();
    println!("sha256: {:.0} MB/s", (n * 65000) as f64 / s / 1e6);
    let t = Instant::now();
    let mut v = vec![0u8; 65000];
    for _ in 0..n {
        v.copy_from_slice(&buf);
        std::hint::black_box(&v);
    }
    println!(
        "memcpy: {:.0} MB/s",
        (n * 65000) as f64 / t.elapsed().as_secs_f64() / 1e6
    );
}

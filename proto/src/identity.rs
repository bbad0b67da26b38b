//! Long-term identity: an ed25519 signing key (who a user is) and an X25519
//! Noise static key (what the handshake proves), bound together by an
//! ed25519 signature over the Noise key under a fixed context prefix, as
//! libp2p's Noise handshake payload does. A peer accepts a Noise static key
//! only with a valid binding signature from the identity it expects.

use crate::codec::{DecodeError, Reader, Writer};
use crate::Secret;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Prefix of the message signed to bind a Noise static key to an identity.
pub const BINDING_CONTEXT: &[u8] = b"p2p-chat noise static key v1:";
/// Prefix of the message signed to answer a server's login challenge.
pub const LOGIN_CONTEXT: &[u8] = b"p2p-chat login v1:";

/// Encoded size of a [`PublicIdentity`].
pub const PUBLIC_IDENTITY_LEN: usize = 32 + 32 + 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity key is not a valid ed25519 public key")]
    BadKey,
    #[error("signature binding the Noise key to the identity does not verify")]
    BadBinding,
    #[error("Noise static key in the handshake differs from the one the identity signed")]
    NoiseKeyMismatch,
    #[error("secret key file has the wrong length ({0} bytes, expected 64)")]
    BadSecretLength(usize),
}

/// A user's or server's private keys.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    noise_private: Secret<[u8; 32]>,
    noise_public: [u8; 32],
}

/// A fresh X25519 private key from the operating system's random source.
pub fn generate_static_keypair() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
    k
}

/// The X25519 public key of a private key.
pub fn public_from_private(private: &[u8; 32]) -> [u8; 32] {
    curve25519_dalek::montgomery::MontgomeryPoint::mul_base_clamped(*private).to_bytes()
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Makes fresh keys from the operating system's random source.
    pub fn generate() -> Self {
        let signing = SigningKey::generate(&mut rand::rngs::OsRng);
        let kp = generate_static_keypair();
        Self::from_parts(signing, kp)
    }

    fn from_parts(signing: SigningKey, noise_private: [u8; 32]) -> Self {
        let noise_public = public_from_private(&noise_private);
        Self {
            signing,
            noise_private: Secret(noise_private),
            noise_public,
        }
    }

    /// The 64 secret bytes kept in the key file: ed25519 seed, then the
    /// X25519 private key.
    pub fn to_secret_bytes(&self) -> Secret<[u8; 64]> {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.signing.to_bytes());
        out[32..].copy_from_slice(&self.noise_private.0);
        Secret(out)
    }

    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        if bytes.len() != 64 {
            return Err(IdentityError::BadSecretLength(bytes.len()));
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&bytes[..32]);
        let mut noise = [0u8; 32];
        noise.copy_from_slice(&bytes[32..]);
        Ok(Self::from_parts(SigningKey::from_bytes(&seed), noise))
    }

    pub fn sign_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub fn noise_private(&self) -> &[u8; 32] {
        &self.noise_private.0
    }

    pub fn noise_public(&self) -> [u8; 32] {
        self.noise_public
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.sign_key())
    }

    /// The public half, with the binding signature.
    pub fn public(&self) -> PublicIdentity {
        let sig = self.signing.sign(&binding_message(&self.noise_public));
        PublicIdentity {
            sign_key: self.sign_key(),
            noise_key: self.noise_public,
            binding: sig.to_bytes(),
        }
    }

    /// Answers a login challenge from the server whose Noise key is
    /// `server_noise_key`.
    pub fn sign_login(&self, challenge: &[u8; 16], server_noise_key: &[u8; 32]) -> [u8; 64] {
        self.signing
            .sign(&login_message(challenge, server_noise_key))
            .to_bytes()
    }
}

fn binding_message(noise_key: &[u8; 32]) -> Vec<u8> {
    [BINDING_CONTEXT, noise_key.as_slice()].concat()
}

fn login_message(challenge: &[u8; 16], server_noise_key: &[u8; 32]) -> Vec<u8> {
    [
        LOGIN_CONTEXT,
        challenge.as_slice(),
        server_noise_key.as_slice(),
    ]
    .concat()
}

/// What others know of an identity: its ed25519 key, its Noise static key
/// and the signature binding them.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicIdentity {
    pub sign_key: [u8; 32],
    pub noise_key: [u8; 32],
    pub binding: [u8; 64],
}

impl std::fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicIdentity({})", self.fingerprint())
    }
}

impl PublicIdentity {
    /// Checks the binding signature.
    pub fn verify(&self) -> Result<(), IdentityError> {
        let key = VerifyingKey::from_bytes(&self.sign_key).map_err(|_| IdentityError::BadKey)?;
        let sig = Signature::from_bytes(&self.binding);
        key.verify_strict(&binding_message(&self.noise_key), &sig)
            .map_err(|_| IdentityError::BadBinding)
    }

    /// Checks the binding signature and that the handshake's remote static
    /// key is the one it binds.
    pub fn verify_for_noise_key(&self, remote_static: &[u8]) -> Result<(), IdentityError> {
        self.verify()?;
        if remote_static != self.noise_key {
            return Err(IdentityError::NoiseKeyMismatch);
        }
        Ok(())
    }

    pub fn verify_login(
        &self,
        challenge: &[u8; 16],
        server_noise_key: &[u8; 32],
        sig: &[u8; 64],
    ) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.sign_key) else {
            return false;
        };
        key.verify_strict(
            &login_message(challenge, server_noise_key),
            &Signature::from_bytes(sig),
        )
        .is_ok()
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.sign_key)
    }

    pub fn encode(&self, w: &mut Writer) {
        w.bytes(&self.sign_key)
            .bytes(&self.noise_key)
            .bytes(&self.binding);
    }

    /// Decodes the fields; the signature is checked by [`Self::verify`].
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            sign_key: r.array()?,
            noise_key: r.array()?,
            binding: r.array()?,
        })
    }
}

/// A fingerprint people can compare: the first 16 bytes of SHA-256 of the
/// key, in eight groups of four hex digits.
pub fn fingerprint(key: &[u8; 32]) -> String {
    let digest = Sha256::digest(key);
    digest[..16]
        .chunks(2)
        .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
        .collect::<Vec<_>>()
        .join(":")
}

/// Lower-case hex of bytes (keys in the control API and config files).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses exactly 32 bytes of hex.
pub fn key_from_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Encodes an identity as the payload of a handshake message.
pub fn identity_payload(id: &PublicIdentity) -> Vec<u8> {
    let mut w = Writer::new();
    id.encode(&mut w);
    w.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_verifies_and_detects_tampering() {
        let id = Identity::generate();
        let public = id.public();
        public.verify().unwrap();
        public.verify_for_noise_key(&id.noise_public()).unwrap();

        let other = Identity::generate();
        assert_eq!(
            public.verify_for_noise_key(&other.noise_public()),
            Err(IdentityError::NoiseKeyMismatch)
        );
        let mut forged = public.clone();
        forged.noise_key = other.noise_public();
        assert_eq!(forged.verify(), Err(IdentityError::BadBinding));
        let mut garbage = public.clone();
        garbage.binding = [0xff; 64];
        assert!(garbage.verify().is_err());
    }

    #[test]
    fn secret_bytes_round_trip() {
        let id = Identity::generate();
        let back = Identity::from_secret_bytes(&id.to_secret_bytes().0).unwrap();
        assert_eq!(back.public(), id.public());
        assert_eq!(
            Identity::from_secret_bytes(&[0; 10]).unwrap_err(),
            IdentityError::BadSecretLength(10)
        );
    }

    #[test]
    fn login_signature_is_bound_to_challenge_and_server() {
        let id = Identity::generate();
        let server = [7u8; 32];
        let sig = id.sign_login(&[1; 16], &server);
        assert!(id.public().verify_login(&[1; 16], &server, &sig));
        assert!(!id.public().verify_login(&[2; 16], &server, &sig));
        assert!(!id.public().verify_login(&[1; 16], &[8; 32], &sig));
    }

    #[test]
    fn fingerprint_and_hex() {
        let fp = fingerprint(&[0u8; 32]);
        assert_eq!(fp.len(), 8 * 4 + 7);
        let k = [0xab; 32];
        assert_eq!(key_from_hex(&to_hex(&k)), Some(k));
        assert_eq!(key_from_hex("zz"), None);
        assert_eq!(key_from_hex(&"é".repeat(32)), None);
    }
}

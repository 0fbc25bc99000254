/* format.c: the keyfs on-disk formats v1 and v2: header encode/parse/tag, chunk seal/open, size arithmetic */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#if defined(__aarch64__)
#include <sys/auxv.h>
#endif

#include <openssl/evp.h>
#include <sodium.h>

#include "keyfs/format.h"

/*
 * A file starts with two header slots of 1024 bytes each (at 0 and 1024); chunks follow at
 * 2048. A new file fills slot 0 and leaves slot 1 zero; a rewrite (a re-wrapped DEK) goes to
 * the slot not in use with the next generation, so a torn write never loses the DEK.
 * Slot layout v1 (docs/FORMAT.md), integers little-endian:
 *   0    8  magic "KEYFSHDR"
 *   8    2  format version (1, or 2 in a v2 file: the layout of its volume)
 *  10    1  cipher id (1 = XChaCha20-Poly1305, 2 = XAES-256-GCM: v2 files only)
 *  11    1  log2 of the chunk size (12)
 *  12    4  header size (1024)
 *  16   16  file id
 *  32    1  key id length Lk (1..255)
 *  33    1  key version length Lv (0..64)
 *  34    2  wrapped DEK length Lw (1..600)
 *  36    4  generation (>= 1): of the two slots, the newest that authenticates is current
 *  40   Lk  key id, then Lv key version, then Lw wrapped DEK
 *  ...      zero padding up to 992
 * 992   32  tag: keyed BLAKE2b-256 of bytes 0..991 with the header subkey
 */
#define OFF_VERSION     8
#define OFF_CIPHER      10
#define OFF_CHUNK_SHIFT 11
#define OFF_HDR_SIZE    12
#define OFF_FILE_ID     16
#define OFF_KEY_ID_LEN  32
#define OFF_KEY_VER_LEN 33
#define OFF_WRAPPED_LEN 34
#define OFF_GENERATION  36
#define OFF_VAR         40
#define OFF_TAG         (FMT_HEADER_SIZE - FMT_HEADER_TAG_SIZE)

_Static_assert(OFF_VAR + FMT_KEY_ID_MAX + FMT_KEY_VERSION_MAX + FMT_WRAPPED_MAX <= OFF_TAG,
	       "variable header fields must fit before the tag");
_Static_assert(FMT_CHUNK_SIZE == 1u << FMT_CHUNK_SHIFT, "chunk size and shift disagree");

/* KDF context and subkey ids: changing them changes the format. */
static const char kdf_context[crypto_kdf_CONTEXTBYTES] = { 'k', 'e', 'y', 'f', 's', '-', 'v', '1' };
enum { SUBKEY_CONTENT = 1, SUBKEY_HEADER = 2, SUBKEY_CONTENT_XAES = 3 };

static void put_le16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static void put_le32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get_le16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static bool printable(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (s[i] < 0x21 || s[i] > 0x7e)
			return false;
	return true;
}

static int xaes_k1(const uint8_t key[32], uint8_t k1[16]);

int fmt_keys_derive(const uint8_t dek[FMT_DEK_SIZE], uint8_t cipher, struct fmt_keys *out)
{
	sodium_memzero(out, sizeof(*out));
	if (cipher != FMT_CIPHER_XCHACHA20_POLY1305 && cipher != FMT_CIPHER_XAES_256_GCM)
		return -EINVAL;
	out->cipher = cipher;
	crypto_kdf_derive_from_key(out->content, sizeof(out->content),
				   cipher == FMT_CIPHER_XAES_256_GCM ? SUBKEY_CONTENT_XAES : SUBKEY_CONTENT, kdf_context, dek);
	crypto_kdf_derive_from_key(out->header, sizeof(out->header), SUBKEY_HEADER, kdf_context, dek);
	if (cipher == FMT_CIPHER_XAES_256_GCM && xaes_k1(out->content, out->xaes_k1) < 0) {
		sodium_memzero(out, sizeof(*out));
		return -EIO;
	}
	return 0;
}

static void header_tag(const uint8_t buf[FMT_HEADER_SIZE], const struct fmt_keys *keys,
		       uint8_t tag[FMT_HEADER_TAG_SIZE])
{
	crypto_generichash(tag, FMT_HEADER_TAG_SIZE, buf, OFF_TAG, keys->header, sizeof(keys->header));
}

int fmt_header_parse(const uint8_t buf[FMT_HEADER_SIZE], struct fmt_header *ret)
{
	struct fmt_header h;
	size_t lk, lv, lw, end;

	if (memcmp(buf, FMT_MAGIC, FMT_MAGIC_SIZE) != 0)
		return -EBADMSG;
	h.version = get_le16(buf + OFF_VERSION);
	if (h.version < 1 || h.version > FMT_VERSION_MAX)
		return -EPROTONOSUPPORT;
	h.cipher = buf[OFF_CIPHER];
	if (!fmt_cipher_valid(h.cipher, (enum fmt_layout)h.version))
		return -EPROTONOSUPPORT;
	if (buf[OFF_CHUNK_SHIFT] != FMT_CHUNK_SHIFT || get_le32(buf + OFF_HDR_SIZE) != FMT_HEADER_SIZE)
		return -EBADMSG;
	h.generation = get_le32(buf + OFF_GENERATION);
	if (h.generation == 0)
		return -EBADMSG;
	h.chunk_size = FMT_CHUNK_SIZE;
	memcpy(h.file_id, buf + OFF_FILE_ID, FMT_FILE_ID_SIZE);
	if (sodium_is_zero(h.file_id, FMT_FILE_ID_SIZE))
		return -EBADMSG;

	lk = buf[OFF_KEY_ID_LEN];
	lv = buf[OFF_KEY_VER_LEN];
	lw = get_le16(buf + OFF_WRAPPED_LEN);
	if (lk == 0 || lk > FMT_KEY_ID_MAX || lv > FMT_KEY_VERSION_MAX || lw == 0 || lw > FMT_WRAPPED_MAX)
		return -EBADMSG;
	end = OFF_VAR + lk + lv + lw;
	if (!printable((const char *)buf + OFF_VAR, lk) || !printable((const char *)buf + OFF_VAR + lk, lv))
		return -EBADMSG;
	/* Padding must be zero: the tag covers it anyway, but a clean parse keeps inspect honest. */
	if (!sodium_is_zero(buf + end, OFF_TAG - end))
		return -EBADMSG;

	memcpy(h.key_id, buf + OFF_VAR, lk);
	h.key_id[lk] = '\0';
	memcpy(h.key_version, buf + OFF_VAR + lk, lv);
	h.key_version[lv] = '\0';
	memcpy(h.wrapped, buf + OFF_VAR + lk + lv, lw);
	h.wrapped_len = lw;
	memcpy(h.tag, buf + OFF_TAG, FMT_HEADER_TAG_SIZE);
	*ret = h;
	return 0;
}

int fmt_header_encode(const struct fmt_header *h, const struct fmt_keys *keys, uint8_t buf[FMT_HEADER_SIZE])
{
	size_t lk = strnlen(h->key_id, sizeof(h->key_id));
	size_t lv = strnlen(h->key_version, sizeof(h->key_version));
	uint8_t *p;

	if (lk == 0 || lk > FMT_KEY_ID_MAX || lv > FMT_KEY_VERSION_MAX ||
	    h->wrapped_len == 0 || h->wrapped_len > FMT_WRAPPED_MAX ||
	    !printable(h->key_id, lk) || !printable(h->key_version, lv) ||
	    sodium_is_zero(h->file_id, FMT_FILE_ID_SIZE) || h->generation == 0)
		return -EINVAL;
	if (!fmt_cipher_valid(keys->cipher, h->version == FMT_LAYOUT_V2 ? FMT_LAYOUT_V2 : FMT_LAYOUT_V1))
		return -EINVAL;

	memset(buf, 0, FMT_HEADER_SIZE);
	memcpy(buf, FMT_MAGIC, FMT_MAGIC_SIZE);
	put_le16(buf + OFF_VERSION, h->version == FMT_LAYOUT_V2 ? FMT_LAYOUT_V2 : FMT_VERSION);
	buf[OFF_CIPHER] = keys->cipher;
	buf[OFF_CHUNK_SHIFT] = FMT_CHUNK_SHIFT;
	put_le32(buf + OFF_HDR_SIZE, FMT_HEADER_SIZE);
	memcpy(buf + OFF_FILE_ID, h->file_id, FMT_FILE_ID_SIZE);
	buf[OFF_KEY_ID_LEN] = (uint8_t)lk;
	buf[OFF_KEY_VER_LEN] = (uint8_t)lv;
	put_le16(buf + OFF_WRAPPED_LEN, (uint16_t)h->wrapped_len);
	put_le32(buf + OFF_GENERATION, h->generation);
	p = buf + OFF_VAR;
	memcpy(p, h->key_id, lk);
	memcpy(p + lk, h->key_version, lv);
	memcpy(p + lk + lv, h->wrapped, h->wrapped_len);
	header_tag(buf, keys, buf + OFF_TAG);
	return 0;
}

int fmt_header_verify(const uint8_t buf[FMT_HEADER_SIZE], const struct fmt_keys *keys)
{
	uint8_t tag[FMT_HEADER_TAG_SIZE];
	int r;

	header_tag(buf, keys, tag);
	r = sodium_memcmp(tag, buf + OFF_TAG, FMT_HEADER_TAG_SIZE) == 0 ? 0 : -EBADMSG;
	sodium_memzero(tag, sizeof(tag));
	return r;
}

/* Associated data of a chunk: file id || chunk index (LE64), so chunks cannot move. */
static void chunk_ad(const uint8_t file_id[FMT_FILE_ID_SIZE], uint64_t index, uint8_t ad[FMT_FILE_ID_SIZE + 8])
{
	memcpy(ad, file_id, FMT_FILE_ID_SIZE);
	put_le64(ad + FMT_FILE_ID_SIZE, index);
}

/*
 * The chunk AEAD is XChaCha20-Poly1305-IETF, computed as its definition: subkey = HChaCha20(key,
 * nonce[0..16]), then ChaCha20-Poly1305 of RFC 8439 with the subkey and the 12-byte nonce
 * 0^4 || nonce[16..24]. libsodium's HChaCha20 and OpenSSL's ChaCha20-Poly1305 (AVX2) give the very
 * bytes of libsodium's crypto_aead_xchacha20poly1305_ietf_*, 1.2-1.4x faster a 4 KiB chunk on the
 * reference CPU (docs/FORMAT.md, cipher choice; tests/unit/test_format.c compares the two).
 * libsodium stays the fallback when OpenSSL cannot give the cipher or fails before any output.
 *
 * One EVP context per call, or per request between fmt_chunk_hold and fmt_chunk_release: freeing
 * it wipes the provider state (OpenSSL 3 clears the ChaCha key and the Poly1305 state before
 * freeing; keyfs and keyfsctl install secmem's wiping allocators first in main). Reusing one for
 * the chunks of a request saves about 0.3 us a chunk (bench/aead-bench.c: allocate, set up and
 * free), 77 us of a 1 MiB write; it is freed when the request ends, so no subkey or Poly1305 key
 * stays in the ordinary heap between requests (the subkey alone forges any chunk of the file
 * under that nonce).
 */
enum evp_kind { EVP_CHACHA, EVP_GCM, EVP_ECB, EVP_KINDS };

static const char *const evp_names[EVP_KINDS] = { "ChaCha20-Poly1305", "AES-256-GCM", "AES-256-ECB" };
static EVP_CIPHER *evp[EVP_KINDS];
static pthread_once_t evp_once = PTHREAD_ONCE_INIT;
static _Thread_local EVP_CIPHER_CTX *held_ctx[EVP_KINDS];      /* set up with evp[k]; only while held */
static _Thread_local unsigned held;
/* The keys whose content key the held AES-256-ECB context is set up with: the chunks of one
 * request are of one file, so XAES-256-GCM sets it up once a request, not once a chunk. A
 * request's keys stay in place while it runs (its file's content lock), and the context goes
 * at the release, so the pointer cannot name other keys meanwhile. */
static _Thread_local const struct fmt_keys *held_ecb_keys;

static void evp_fetch(void)
{
	for (int k = 0; k < EVP_KINDS; k++)
		evp[k] = EVP_CIPHER_fetch(NULL, evp_names[k], NULL);
}

static EVP_CIPHER *evp_get(enum evp_kind k)
{
	pthread_once(&evp_once, evp_fetch);
	return evp[k];
}

void fmt_chunk_hold(void)
{
	held++;
}

void fmt_chunk_release(void)
{
	if (held > 0 && --held == 0) {
		for (int k = 0; k < EVP_KINDS; k++) {
			EVP_CIPHER_CTX_free(held_ctx[k]);
			held_ctx[k] = NULL;
		}
		held_ecb_keys = NULL;
	}
}

/* A context of kind k set up with key and IV: the held one (set up afresh), or a new one. */
static EVP_CIPHER_CTX *ctx_get(enum evp_kind k, const uint8_t *key, const uint8_t *iv, int enc)
{
	EVP_CIPHER_CTX *c;

	if (k == EVP_ECB)
		held_ecb_keys = NULL;   /* set up afresh below: xaes_derive says for which keys */
	if (held && held_ctx[k]) {
		if (EVP_CipherInit_ex2(held_ctx[k], NULL, key, iv, enc, NULL))
			return held_ctx[k];
		EVP_CIPHER_CTX_free(held_ctx[k]);
		held_ctx[k] = NULL;
		return NULL;
	}
	if (!evp_get(k))
		return NULL;
	c = EVP_CIPHER_CTX_new();
	if (c && !EVP_CipherInit_ex2(c, evp[k], key, iv, enc, NULL)) {
		EVP_CIPHER_CTX_free(c);
		c = NULL;
	}
	if (c && k == EVP_ECB)
		EVP_CIPHER_CTX_set_padding(c, 0);
	if (c && held)
		held_ctx[k] = c;
	return c;
}

static void ctx_put(enum evp_kind k, EVP_CIPHER_CTX *c, bool ok)
{
	if (c == held_ctx[k] && ok)
		return;
	if (c == held_ctx[k]) {
		held_ctx[k] = NULL;     /* in an unknown state: the next chunk starts afresh */
		if (k == EVP_ECB)
			held_ecb_keys = NULL;
	}
	EVP_CIPHER_CTX_free(c);
}

/*
 * XAES-256-GCM (C2SP, c2sp.org/XAES-256-GCM): AES-256-GCM under a key derived from the content
 * key K and the first 12 nonce bytes, so that random 24-byte nonces are safe for far more than
 * GCM's 2^32 messages a key:
 *   L = AES-256_K(0^128), K1 = L doubled in GF(2^128) (CMAC's first subkey; once per file)
 *   Kx = AES-256_K(K1 ^ 00 01 58 00 || N[0..12]) || AES-256_K(K1 ^ 00 02 58 00 || N[0..12])
 *   XAES-256-GCM_K(N, P, A) = AES-256-GCM_Kx(iv = N[12..24], P, A)
 * In a v2 chunk N = random (16) || index (LE64): every write draws a fresh Kx (96 random bits),
 * and its IV holds the last 4 random bytes and the chunk index.
 */
static int xaes_k1(const uint8_t key[32], uint8_t k1[16])
{
	static const uint8_t zero[16];
	uint8_t l[16];
	EVP_CIPHER_CTX *c = ctx_get(EVP_ECB, key, NULL, 1);
	int n = 0;
	bool ok;

	if (!c)
		return -EIO;
	ok = EVP_CipherUpdate(c, l, &n, zero, sizeof(zero)) && n == (int)sizeof(l);
	ctx_put(EVP_ECB, c, ok);
	if (ok) {
		for (int i = 0; i < 15; i++)
			k1[i] = (uint8_t)(l[i] << 1 | l[i + 1] >> 7);
		k1[15] = (uint8_t)(l[15] << 1 ^ ((l[0] >> 7) * 0x87));
	}
	sodium_memzero(l, sizeof(l));
	return ok ? 0 : -EIO;
}

/* Kx of XAES-256-GCM for the first 12 bytes of nonce. */
static int xaes_derive(const struct fmt_keys *keys, const uint8_t nonce[FMT_NONCE_SIZE], uint8_t kx[32])
{
	uint8_t m[32];
	EVP_CIPHER_CTX *c;
	int n = 0;
	bool ok;

	for (int i = 0; i < 2; i++) {
		uint8_t *b = m + 16 * i;

		b[0] = 0x00;
		b[1] = (uint8_t)(i + 1);
		b[2] = 0x58;    /* 'X' */
		b[3] = 0x00;
		memcpy(b + 4, nonce, 12);
		for (int j = 0; j < 16; j++)
			b[j] ^= keys->xaes_k1[j];
	}
	if (held && held_ctx[EVP_ECB] && held_ecb_keys == keys) {
		c = held_ctx[EVP_ECB];
	} else {
		c = ctx_get(EVP_ECB, keys->content, NULL, 1);
		if (c && c == held_ctx[EVP_ECB])
			held_ecb_keys = keys;
	}
	ok = c && EVP_CipherUpdate(c, kx, &n, m, sizeof(m)) && n == (int)sizeof(m);
	if (c)
		ctx_put(EVP_ECB, c, ok);
	sodium_memzero(m, sizeof(m));
	if (!ok)
		sodium_memzero(kx, 32);
	return ok ? 0 : -EIO;
}

enum { XC_DONE = 0, XC_FORGED = 1, XC_UNAVAILABLE = -1 };

/* Seal (enc) or open len bytes of in into out with tag (written, or checked), the AEAD of kind k
 * keyed with key and iv (12 bytes). Returns XC_DONE, XC_FORGED (open: the tag does not
 * authenticate) or XC_UNAVAILABLE (libcrypto failed); out holds no plaintext unless XC_DONE. */
static int aead_ossl(enum evp_kind k, int enc, const uint8_t key[32], const uint8_t iv[12], const uint8_t *ad,
		     size_t adlen, const uint8_t *in, size_t len, uint8_t *out, uint8_t tag[FMT_TAG_SIZE])
{
	EVP_CIPHER_CTX *c = ctx_get(k, key, iv, enc);
	int n, r = XC_UNAVAILABLE;
	bool touched = false;   /* out written: in place (v2 reads), in is gone then */

	if (!c)
		return XC_UNAVAILABLE;
	if (!EVP_CipherUpdate(c, NULL, &n, ad, (int)adlen))
		goto out;
	touched = true;
	if (!EVP_CipherUpdate(c, out, &n, in, (int)len))
		goto out;
	if (enc) {
		if (EVP_CipherFinal_ex(c, out + n, &n) && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, FMT_TAG_SIZE, tag))
			r = XC_DONE;
	} else if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, FMT_TAG_SIZE, tag)) {
		/* Final fails for a tag mismatch only: everything else that can fail already has. */
		r = EVP_CipherFinal_ex(c, out + n, &n) ? XC_DONE : XC_FORGED;
	}
out:
	ctx_put(k, c, r == XC_DONE);
	if (r != XC_DONE && (enc || touched || in != out))
		sodium_memzero(out, len);       /* OpenSSL decrypts before it checks: no plaintext of a forgery */
	/* Once out was written, in may be gone (in place): a libsodium retry could not help. */
	if (r == XC_UNAVAILABLE && touched && in == out && !enc)
		r = XC_FORGED;
	return r;
}

/* XChaCha20-Poly1305-IETF through libcrypto (see above); XC_UNAVAILABLE: use libsodium. */
static int xchacha_ossl(int enc, const uint8_t key[32], const uint8_t nonce[FMT_NONCE_SIZE],
			const uint8_t *ad, size_t adlen, const uint8_t *in, size_t len, uint8_t *out,
			uint8_t tag[FMT_TAG_SIZE])
{
	uint8_t sub[32], iv[12] = { 0 };
	int r;

	if (!evp_get(EVP_CHACHA))
		return XC_UNAVAILABLE;
	crypto_core_hchacha20(sub, nonce, key, NULL);
	memcpy(iv + 4, nonce + 16, 8);
	r = aead_ossl(EVP_CHACHA, enc, sub, iv, ad, adlen, in, len, out, tag);
	sodium_memzero(sub, sizeof(sub));
	return r;
}

/* XAES-256-GCM; no fallback: XC_UNAVAILABLE is a failure. */
static int xaes_ossl(int enc, const struct fmt_keys *keys, const uint8_t nonce[FMT_NONCE_SIZE],
		     const uint8_t *ad, size_t adlen, const uint8_t *in, size_t len, uint8_t *out,
		     uint8_t tag[FMT_TAG_SIZE])
{
	uint8_t kx[32];
	int r;

	if (xaes_derive(keys, nonce, kx) < 0)
		r = XC_UNAVAILABLE;
	else
		r = aead_ossl(EVP_GCM, enc, kx, nonce + 12, ad, adlen, in, len, out, tag);
	sodium_memzero(kx, sizeof(kx));
	if (r != XC_DONE)
		sodium_memzero(out, len);
	return r;
}

int fmt_xaes_256_gcm(int enc, const uint8_t key[32], const uint8_t nonce[FMT_NONCE_SIZE], const uint8_t *ad,
		     size_t adlen, const uint8_t *in, size_t len, uint8_t *out, uint8_t tag[FMT_TAG_SIZE])
{
	struct fmt_keys k;
	int r = -EIO;

	memset(&k, 0, sizeof(k));
	memcpy(k.content, key, sizeof(k.content));
	k.cipher = FMT_CIPHER_XAES_256_GCM;
	if (xaes_k1(k.content, k.xaes_k1) == 0) {
		switch (xaes_ossl(enc, &k, nonce, ad, adlen, in, len, out, tag)) {
		case XC_DONE:
			r = 0;
			break;
		case XC_FORGED:
			r = -EBADMSG;
			break;
		}
	} else {
		sodium_memzero(out, len);
	}
	sodium_memzero(&k, sizeof(k));
	return r;
}

int fmt_chunk_seal(const struct fmt_keys *keys, const uint8_t file_id[FMT_FILE_ID_SIZE], uint64_t index,
		   const uint8_t nonce[FMT_NONCE_SIZE], const uint8_t *pt, size_t len, uint8_t *out)
{
	uint8_t ad[FMT_FILE_ID_SIZE + 8];
	unsigned long long clen;

	if (len == 0 || len > FMT_CHUNK_SIZE)
		return -EINVAL;
	chunk_ad(file_id, index, ad);
	memcpy(out, nonce, FMT_NONCE_SIZE);
	if (xchacha_ossl(1, keys->content, nonce, ad, sizeof(ad), pt, len, out + FMT_NONCE_SIZE,
			 out + FMT_NONCE_SIZE + len) != XC_DONE)
		crypto_aead_xchacha20poly1305_ietf_encrypt(out + FMT_NONCE_SIZE, &clen, pt, len, ad, sizeof(ad),
							   NULL, nonce, keys->content);
	return 0;
}

/* v2 associated data: file id || index (LE64) || layout 2. The layout byte keeps a v2 chunk from
 * ever opening as anything else; the structures differ anyway. */
static void chunk_ad_v2(const uint8_t file_id[FMT_FILE_ID_SIZE], uint64_t index, uint8_t ad[FMT_FILE_ID_SIZE + 9])
{
	chunk_ad(file_id, index, ad);
	ad[FMT_FILE_ID_SIZE + 8] = FMT_LAYOUT_V2;
}

/* The 24-byte XChaCha20 nonce of a v2 chunk: random || index (LE64). The random half goes into
 * HChaCha20, so every write of a chunk has its own subkey; the index half is the ChaCha20 nonce
 * under it. */
static void nonce_v2(const uint8_t random[FMT_V2_RANDOM_SIZE], uint64_t index, uint8_t nonce[FMT_NONCE_SIZE])
{
	memcpy(nonce, random, FMT_V2_RANDOM_SIZE);
	put_le64(nonce + FMT_V2_RANDOM_SIZE, index);
}

int fmt_chunk_seal_v2(const struct fmt_keys *keys, const uint8_t file_id[FMT_FILE_ID_SIZE], uint64_t index,
		      const uint8_t random[FMT_V2_RANDOM_SIZE], const uint8_t *pt, size_t len, uint8_t *out,
		      uint8_t entry[FMT_V2_ENTRY_SIZE])
{
	uint8_t ad[FMT_FILE_ID_SIZE + 9], nonce[FMT_NONCE_SIZE];
	unsigned long long tlen;

	if (len == 0 || len > FMT_CHUNK_SIZE)
		return -EINVAL;
	chunk_ad_v2(file_id, index, ad);
	nonce_v2(random, index, nonce);
	memcpy(entry, random, FMT_V2_RANDOM_SIZE);
	if (keys->cipher == FMT_CIPHER_XAES_256_GCM) {
		if (xaes_ossl(1, keys, nonce, ad, sizeof(ad), pt, len, out, entry + FMT_V2_RANDOM_SIZE) == XC_DONE)
			return 0;
		sodium_memzero(entry, FMT_V2_ENTRY_SIZE);
		return -EIO;
	}
	if (xchacha_ossl(1, keys->content, nonce, ad, sizeof(ad), pt, len, out,
			 entry + FMT_V2_RANDOM_SIZE) != XC_DONE)
		crypto_aead_xchacha20poly1305_ietf_encrypt_detached(out, entry + FMT_V2_RANDOM_SIZE, &tlen, pt, len,
								    ad, sizeof(ad), NULL, nonce, keys->content);
	return 0;
}

bool fmt_v2_entry_is_hole(const uint8_t entry[FMT_V2_ENTRY_SIZE])
{
	static const uint8_t zero[FMT_V2_ENTRY_SIZE];

	return memcmp(entry, zero, FMT_V2_ENTRY_SIZE) == 0;     /* public bytes: no need for constant time */
}

int fmt_chunk_open_v2(const struct fmt_keys *keys, const uint8_t file_id[FMT_FILE_ID_SIZE], uint64_t index,
		      const uint8_t entry[FMT_V2_ENTRY_SIZE], const uint8_t *ct, size_t len, uint8_t *pt)
{
	uint8_t ad[FMT_FILE_ID_SIZE + 9], nonce[FMT_NONCE_SIZE], tag[FMT_TAG_SIZE];

	if (len == 0 || len > FMT_CHUNK_SIZE)
		return -EBADMSG;
	if (fmt_v2_entry_is_hole(entry)) {
		/* Only a full chunk can be a hole: a partial last chunk is always sealed. */
		if (len != FMT_CHUNK_SIZE) {
			memset(pt, 0, len);
			return -EBADMSG;
		}
		memset(pt, 0, len);
		return (int)len;
	}
	chunk_ad_v2(file_id, index, ad);
	nonce_v2(entry, index, nonce);
	memcpy(tag, entry + FMT_V2_RANDOM_SIZE, FMT_TAG_SIZE);
	if (keys->cipher == FMT_CIPHER_XAES_256_GCM) {
		switch (xaes_ossl(0, keys, nonce, ad, sizeof(ad), ct, len, pt, tag)) {
		case XC_DONE:
			return (int)len;
		case XC_FORGED:
			return -EBADMSG;
		default:
			return -EIO;    /* pt is zeroed */
		}
	}
	switch (xchacha_ossl(0, keys->content, nonce, ad, sizeof(ad), ct, len, pt, tag)) {
	case XC_DONE:
		return (int)len;
	case XC_FORGED:
		return -EBADMSG;        /* pt is zeroed */
	}
	if (crypto_aead_xchacha20poly1305_ietf_decrypt_detached(pt, NULL, ct, len, tag, ad, sizeof(ad), nonce,
								keys->content) != 0) {
		sodium_memzero(pt, len);
		return -EBADMSG;
	}
	return (int)len;
}

const char *fmt_chunk_impl(void)
{
	return evp_get(EVP_CHACHA) ? "openssl" : "libsodium";
}

/* Whether a stored chunk is all zero bytes. Ciphertext is public, so this need not be constant
 * time; a sealed chunk starts with a random nonce and fails at the first byte almost always.
 * (libsodium's constant-time sodium_is_zero took half of all read time here.) */
static bool all_zero(const uint8_t *p, size_t len)
{
	return len > 0 && p[0] == 0 && memcmp(p, p + 1, len - 1) == 0;
}

int fmt_chunk_open(const struct fmt_keys *keys, const uint8_t file_id[FMT_FILE_ID_SIZE], uint64_t index,
		   const uint8_t *ct, size_t ctlen, uint8_t *pt)
{
	uint8_t ad[FMT_FILE_ID_SIZE + 8], tag[FMT_TAG_SIZE];
	unsigned long long plen;

	if (ctlen <= FMT_CHUNK_OVERHEAD || ctlen > FMT_CHUNK_DISK_SIZE)
		return -EBADMSG;
	/* A hole left by a sparse grow: never produced by seal, whose nonce is random. */
	if (ctlen == FMT_CHUNK_DISK_SIZE && all_zero(ct, ctlen)) {
		memset(pt, 0, FMT_CHUNK_SIZE);
		return FMT_CHUNK_SIZE;
	}
	chunk_ad(file_id, index, ad);
	switch (xchacha_ossl(0, keys->content, ct, ad, sizeof(ad), ct + FMT_NONCE_SIZE, ctlen - FMT_CHUNK_OVERHEAD,
			     pt, memcpy(tag, ct + ctlen - FMT_TAG_SIZE, FMT_TAG_SIZE))) {
	case XC_DONE:
		return (int)(ctlen - FMT_CHUNK_OVERHEAD);
	case XC_FORGED:
		return -EBADMSG;        /* pt is zeroed */
	}
	if (crypto_aead_xchacha20poly1305_ietf_decrypt(pt, &plen, NULL, ct + FMT_NONCE_SIZE,
						       ctlen - FMT_NONCE_SIZE, ad, sizeof(ad), ct,
						       keys->content) != 0) {
		sodium_memzero(pt, ctlen - FMT_CHUNK_OVERHEAD);
		return -EBADMSG;
	}
	return (int)plen;
}

/*
 * Both layouts have the same shape: a header area, then units of disk bytes holding plain
 * plaintext bytes each, and a short last unit that costs overhead bytes more than its plaintext.
 * v1: a unit is a chunk (4136 bytes for 4096; overhead nonce + tag). v2: a unit is a group (a tag
 * page and 128 data pages, 528384 bytes for 512 KiB; overhead the tag page), whose last data page
 * holds exactly the plaintext's length. A rest of 1..overhead bytes after the whole units holds no
 * plaintext byte: a cut inside the chunk (v1) or inside or right after the tag page (v2). It
 * counts as one byte of that unit's first chunk, so the kernel asks for it and the read fails
 * with EIO; counted as none, a file cut there would read as a shorter file without an error.
 */
struct geometry {
	uint64_t header, disk, plain, overhead;
};

static const struct geometry geometry_v1 = { FMT_DATA_OFFSET, FMT_CHUNK_DISK_SIZE, FMT_CHUNK_SIZE, FMT_CHUNK_OVERHEAD };
static const struct geometry geometry_v2 = { FMT_V2_HEADER_AREA, FMT_V2_GROUP_DISK, FMT_V2_GROUP_PLAIN, FMT_V2_PAGE };

static const struct geometry *geometry(enum fmt_layout layout)
{
	return layout == FMT_LAYOUT_V2 ? &geometry_v2 : &geometry_v1;
}

uint64_t fmt_header_area(enum fmt_layout layout)
{
	return geometry(layout)->header;
}

uint64_t fmt_plain_size(enum fmt_layout layout, uint64_t backing_size)
{
	const struct geometry *g = geometry(layout);
	uint64_t full, rest;

	if (backing_size <= g->header)
		return 0;
	full = (backing_size - g->header) / g->disk;
	rest = (backing_size - g->header) % g->disk;
	if (rest > 0 && rest <= g->overhead)
		return full * g->plain + 1;
	return full * g->plain + (rest ? rest - g->overhead : 0);
}

bool fmt_backing_size_valid(enum fmt_layout layout, uint64_t backing_size)
{
	const struct geometry *g = geometry(layout);
	uint64_t rest;

	if (backing_size == 0)
		return true;
	if (backing_size < g->header)
		return false;
	rest = (backing_size - g->header) % g->disk;
	return rest == 0 || rest > g->overhead;
}

uint64_t fmt_backing_size(enum fmt_layout layout, uint64_t plain_size)
{
	const struct geometry *g = geometry(layout);
	uint64_t full = plain_size / g->plain, rest = plain_size % g->plain;

	return g->header + full * g->disk + (rest ? rest + g->overhead : 0);
}

uint64_t fmt_max_plain_size(enum fmt_layout layout)
{
	return layout == FMT_LAYOUT_V2 ? FMT_V2_MAX_PLAIN_SIZE : FMT_MAX_PLAIN_SIZE;
}

void fmt_file_id_hex(const uint8_t file_id[FMT_FILE_ID_SIZE], char out[2 * FMT_FILE_ID_SIZE + 1])
{
	sodium_bin2hex(out, 2 * FMT_FILE_ID_SIZE + 1, file_id, FMT_FILE_ID_SIZE);
}

const char *fmt_cipher_name(uint8_t cipher)
{
	switch (cipher) {
	case FMT_CIPHER_XCHACHA20_POLY1305:
		return "xchacha20-poly1305";
	case FMT_CIPHER_XAES_256_GCM:
		return "xaes-256-gcm";
	}
	return NULL;
}

bool fmt_cipher_valid(uint8_t cipher, enum fmt_layout layout)
{
	return cipher == FMT_CIPHER_XCHACHA20_POLY1305 || (cipher == FMT_CIPHER_XAES_256_GCM && layout == FMT_LAYOUT_V2);
}

uint8_t fmt_cipher_by_name(const char *name)
{
	for (unsigned c = 1; c <= FMT_CIPHER_XAES_256_GCM; c++)
		if (strcmp(name, fmt_cipher_name((uint8_t)c)) == 0)
			return (uint8_t)c;
	return 0;
}

bool fmt_cipher_available(uint8_t cipher)
{
	if (cipher == FMT_CIPHER_XCHACHA20_POLY1305)
		return true;
	return cipher == FMT_CIPHER_XAES_256_GCM && evp_get(EVP_GCM) && evp_get(EVP_ECB);
}

/* AES and carry-less multiply in the CPU: AES-GCM is then fast and constant time. */
static bool cpu_has_aes(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_cpu_init();
	return __builtin_cpu_supports("aes") && __builtin_cpu_supports("pclmul");
#elif defined(__aarch64__)
	unsigned long hw = getauxval(AT_HWCAP);

	return (hw & HWCAP_AES) && (hw & HWCAP_PMULL);
#else
	return false;
#endif
}

uint8_t fmt_cipher_default(void)
{
	return cpu_has_aes() && fmt_cipher_available(FMT_CIPHER_XAES_256_GCM) ? FMT_CIPHER_XAES_256_GCM
									     : FMT_CIPHER_XCHACHA20_POLY1305;
}

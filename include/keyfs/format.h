/* format.h: the keyfs on-disk format v1 (docs/FORMAT.md): header, chunk AEAD, size arithmetic; pure, no I/O */
#ifndef KEYFS_FORMAT_H
#define KEYFS_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define FMT_MAGIC               "KEYFSHDR"      /* 8 bytes, no terminator on disk */
#define FMT_MAGIC_SIZE          8
#define FMT_VERSION             1
#define FMT_HEADER_SIZE         1024            /* one header record (a slot) */
#define FMT_HEADER_SLOTS        2               /* rewritten headers go to the other slot: crash-safe */
#define FMT_DATA_OFFSET         (FMT_HEADER_SLOTS * FMT_HEADER_SIZE)    /* 2048: chunk 0 starts here;
							 * fixed in v1, so sizes follow from the backing size alone */
#define FMT_HEADER_TAG_SIZE     32
#define FMT_CIPHER_XCHACHA20_POLY1305 1
#define FMT_CHUNK_SHIFT         12
#define FMT_CHUNK_SIZE          4096            /* plaintext bytes per chunk */
#define FMT_NONCE_SIZE          24
#define FMT_TAG_SIZE            16
#define FMT_CHUNK_OVERHEAD      (FMT_NONCE_SIZE + FMT_TAG_SIZE)
#define FMT_CHUNK_DISK_SIZE     (FMT_CHUNK_SIZE + FMT_CHUNK_OVERHEAD)
#define FMT_FILE_ID_SIZE        16
#define FMT_DEK_SIZE            32
#define FMT_KEY_ID_MAX          255             /* key id or CRN, printable ASCII */
#define FMT_KEY_VERSION_MAX     64              /* key version id, printable ASCII, may be empty */
#define FMT_WRAPPED_MAX         600             /* wrapped DEK, opaque bytes from the KMS */
/* Largest plaintext size whose backing size still fits in an off_t. */
#define FMT_MAX_PLAIN_SIZE      ((uint64_t)((INT64_MAX - FMT_DATA_OFFSET) / FMT_CHUNK_DISK_SIZE) * FMT_CHUNK_SIZE)

/* A parsed header. Everything in it is public: it is readable without any key. */
struct fmt_header {
	uint32_t generation;            /* >= 1; the slot with the newest that authenticates is current */
	uint16_t version;
	uint8_t cipher;
	uint32_t chunk_size;
	uint8_t file_id[FMT_FILE_ID_SIZE];
	char key_id[FMT_KEY_ID_MAX + 1];
	char key_version[FMT_KEY_VERSION_MAX + 1];
	uint8_t wrapped[FMT_WRAPPED_MAX];
	size_t wrapped_len;
	uint8_t tag[FMT_HEADER_TAG_SIZE];
};

/* Subkeys derived from one file's DEK. Callers keep this struct in sodium_malloc memory. */
struct fmt_keys {
	uint8_t content[32];    /* chunk AEAD key */
	uint8_t header[32];     /* header MAC key */
};

/* Derive the content and header keys from a 32-byte DEK. */
void fmt_keys_derive(const uint8_t dek[FMT_DEK_SIZE], struct fmt_keys *out);

/* Parse the structure of a header (magic, version, cipher, lengths, padding).
 * Does not authenticate it: that needs the keys (fmt_header_verify).
 * Returns 0, -EPROTONOSUPPORT for an unknown version or cipher, -EBADMSG otherwise. */
int fmt_header_parse(const uint8_t buf[FMT_HEADER_SIZE], struct fmt_header *ret);

/* Encode h into buf (exactly FMT_HEADER_SIZE bytes) and compute its tag with keys->header.
 * h->version, cipher and chunk_size are ignored: v1 values are written. Returns 0 or -EINVAL
 * (also for generation 0). */
int fmt_header_encode(const struct fmt_header *h, const struct fmt_keys *keys, uint8_t buf[FMT_HEADER_SIZE]);

/* Check a raw header's tag. Returns 0, or -EBADMSG when it does not authenticate. */
int fmt_header_verify(const uint8_t buf[FMT_HEADER_SIZE], const struct fmt_keys *keys);

/* Seal plaintext chunk number index (len 1..FMT_CHUNK_SIZE) into out (len + FMT_CHUNK_OVERHEAD bytes)
 * with the given 24-byte nonce, which must be fresh random bytes. Returns 0 or -EINVAL. */
int fmt_chunk_seal(const struct fmt_keys *keys, const uint8_t file_id[FMT_FILE_ID_SIZE], uint64_t index,
		   const uint8_t nonce[FMT_NONCE_SIZE], const uint8_t *pt, size_t len, uint8_t *out);

/* Open sealed chunk index (ctlen bytes, FMT_CHUNK_OVERHEAD+1 .. FMT_CHUNK_DISK_SIZE) into pt.
 * A full-size chunk of all zero bytes is a hole and opens to FMT_CHUNK_SIZE zero bytes.
 * Returns the plaintext length, or -EBADMSG when it does not authenticate (pt is then zeroed). */
int fmt_chunk_open(const struct fmt_keys *keys, const uint8_t file_id[FMT_FILE_ID_SIZE], uint64_t index,
		   const uint8_t *ct, size_t ctlen, uint8_t *pt);

/* Which implementation seals and opens chunks: "openssl" (HChaCha20 from libsodium, ChaCha20-Poly1305
 * from libcrypto) or "libsodium" (its XChaCha20-Poly1305, when libcrypto cannot give the cipher).
 * Both write the same bytes. Chunk calls use libcrypto: a program that installs OpenSSL allocators
 * (secmem_init) does so before its first chunk call. */
const char *fmt_chunk_impl(void);

/* The generation of a header that replaces one of generation g. After UINT32_MAX comes 1:
 * a rewrite clears the slot it replaces once the new one is durable, so at most a crash in
 * between leaves both, and both hold the same DEK (docs/FORMAT.md, two header slots). */
static inline uint32_t fmt_generation_next(uint32_t g)
{
	return g == UINT32_MAX ? 1 : g + 1;
}

/* Size arithmetic: no key needed. */

/* Backing offset of header slot i (0 or 1). */
static inline uint64_t fmt_header_offset(unsigned slot)
{
	return (uint64_t)slot * FMT_HEADER_SIZE;
}

/* Plaintext size of a backing file of backing_size bytes. For a size no valid file has
 * (see fmt_backing_size_valid) this covers the cut last chunk too, at least one byte of it,
 * so a read reaches the damage and fails; inside the header area it is 0. */
uint64_t fmt_plain_size(uint64_t backing_size);

/* True when backing_size is a size a well-formed keyfs file can have: 0 (no header yet),
 * or the header slots plus full chunks plus an optional partial chunk of more than the overhead. */
bool fmt_backing_size_valid(uint64_t backing_size);

/* Backing size of a file holding plain_size plaintext bytes (plain_size <= FMT_MAX_PLAIN_SIZE). */
uint64_t fmt_backing_size(uint64_t plain_size);

/* Backing offset of chunk index. */
static inline uint64_t fmt_chunk_offset(uint64_t index)
{
	return FMT_DATA_OFFSET + index * (uint64_t)FMT_CHUNK_DISK_SIZE;
}

/* Lower-case hex of a file id, as used in KMS associated data and by inspect. */
void fmt_file_id_hex(const uint8_t file_id[FMT_FILE_ID_SIZE], char out[2 * FMT_FILE_ID_SIZE + 1]);

/* Name of a cipher id ("xchacha20-poly1305"), or NULL when unknown. */
const char *fmt_cipher_name(uint8_t cipher);

#endif

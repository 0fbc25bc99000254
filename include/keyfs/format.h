/* format.h: the keyfs on-disk formats v1 and v2 (docs/FORMAT.md): header, chunk AEAD, size arithmetic; pure, no I/O */
#ifndef KEYFS_FORMAT_H
#define KEYFS_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define FMT_MAGIC               "KEYFSHDR"      /* 8 bytes, no terminator on disk */
#define FMT_MAGIC_SIZE          8
#define FMT_VERSION             1               /* the v1 header version; see enum fmt_layout */
#define FMT_HEADER_SIZE         1024            /* one header record (a slot) */
#define FMT_HEADER_SLOTS        2               /* rewritten headers go to the other slot: crash-safe */
#define FMT_DATA_OFFSET         (FMT_HEADER_SLOTS * FMT_HEADER_SIZE)    /* 2048: chunk 0 starts here;
							 * fixed in v1, so sizes follow from the backing size alone */
#define FMT_HEADER_TAG_SIZE     32
#define FMT_CIPHER_XCHACHA20_POLY1305 1
#define FMT_CIPHER_XAES_256_GCM 2               /* v2 files only (docs/FORMAT.md, cipher choice) */
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
/* Largest v1 plaintext size whose backing size still fits in an off_t. */
#define FMT_MAX_PLAIN_SIZE      ((uint64_t)((INT64_MAX - FMT_DATA_OFFSET) / FMT_CHUNK_DISK_SIZE) * FMT_CHUNK_SIZE)

/*
 * A volume's file layout. Its value is the volume description's format number and the header's
 * format version: every file of a volume uses the volume's layout, so a plaintext size follows
 * from the backing size alone (stat, ls, du, a locked mount, after a shred).
 *  v1: two header slots (2048 bytes), then chunks of nonce (24) || ciphertext || tag (16).
 *  v2: a 4096-byte header page (the same two slots, then zeros), then groups of one tag page and
 *      up to 128 data pages; data page j of group g holds chunk g*128+j encrypted in place (as
 *      many bytes as its plaintext), tag entry j (32 bytes at 32*j of the tag page) holds the
 *      16 random nonce bytes || the Poly1305 tag. A 4 KiB aligned write touches whole pages.
 * FMT_LAYOUT_ANY is for readers that take any layout (inspect).
 */
enum fmt_layout { FMT_LAYOUT_ANY = 0, FMT_LAYOUT_V1 = 1, FMT_LAYOUT_V2 = 2 };
#define FMT_LAYOUT_DEFAULT      FMT_LAYOUT_V2   /* for new volumes */
#define FMT_VERSION_MAX         2               /* newest header version this build reads */

#define FMT_V2_PAGE             4096
#define FMT_V2_HEADER_AREA      FMT_V2_PAGE     /* slot 0 at 0, slot 1 at 1024, zeros 2048..4095 */
#define FMT_V2_GROUP_CHUNKS     128             /* data pages a tag page covers */
#define FMT_V2_ENTRY_SIZE       32              /* tag entry: random (16) || Poly1305 tag (16) */
#define FMT_V2_RANDOM_SIZE      16
#define FMT_V2_GROUP_DISK       ((uint64_t)(FMT_V2_GROUP_CHUNKS + 1) * FMT_V2_PAGE)     /* 528384 */
#define FMT_V2_GROUP_PLAIN      ((uint64_t)FMT_V2_GROUP_CHUNKS * FMT_CHUNK_SIZE)        /* 524288 */
/* Largest v2 plaintext size (whole groups) whose backing size still fits in an off_t. */
#define FMT_V2_MAX_PLAIN_SIZE   ((uint64_t)((INT64_MAX - FMT_V2_HEADER_AREA) / FMT_V2_GROUP_DISK) * FMT_V2_GROUP_PLAIN)

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
	uint8_t cipher;         /* FMT_CIPHER_*: the file's chunk AEAD, as its header says */
	uint8_t xaes_k1[16];    /* XAES-256-GCM: CMAC subkey K1 of the content key (derived once) */
};

/* Derive the content and header keys of a file whose chunks use cipher from its 32-byte DEK.
 * Each cipher has its own content key (another KDF subkey id), the header key is shared.
 * Returns 0, -EINVAL for an unknown cipher, -EIO when libcrypto cannot give XAES-256-GCM's
 * AES (out is then zeroed). */
int fmt_keys_derive(const uint8_t dek[FMT_DEK_SIZE], uint8_t cipher, struct fmt_keys *out);

/* Parse the structure of a header (magic, version, cipher, lengths, padding).
 * Does not authenticate it: that needs the keys (fmt_header_verify).
 * Returns 0, -EPROTONOSUPPORT for an unknown version or cipher (XAES-256-GCM in a v1 header
 * too), -EBADMSG otherwise. */
int fmt_header_parse(const uint8_t buf[FMT_HEADER_SIZE], struct fmt_header *ret);

/* Encode h into buf (exactly FMT_HEADER_SIZE bytes) and compute its tag with keys->header.
 * h->version is written when it is 2 (a v2 file), else 1; the cipher is keys->cipher (the header
 * MAC covers it, so it cannot be swapped for another); h->cipher and chunk_size are ignored.
 * Returns 0 or -EINVAL (also for generation 0, and XAES-256-GCM in a v1 file). */
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

/*
 * v2 chunks (docs/FORMAT.md, format v2): the file's cipher (keys->cipher: XChaCha20-Poly1305-IETF
 * or XAES-256-GCM) with the 24-byte nonce random (16) || index (u64 LE), associated data
 * file id || index (u64 LE) || 2. The ciphertext is as long as the plaintext and goes to the
 * data page; entry (32 bytes) = random || tag goes to the tag page. random must be fresh random
 * bytes for every write of the chunk.
 * Seal: len 1..FMT_CHUNK_SIZE, out must not overlap pt. Returns 0, -EINVAL, or -EIO when
 * libcrypto fails (XAES-256-GCM has no libsodium fallback; out is then zeroed).
 * Open: ct may equal pt. An all-zero entry is a hole: a full chunk (len == FMT_CHUNK_SIZE) reads
 * as zeros whatever ct holds; a shorter one does not authenticate. Returns len, -EBADMSG (does
 * not authenticate) or -EIO (libcrypto failed); pt is zeroed on either.
 */
int fmt_chunk_seal_v2(const struct fmt_keys *keys, const uint8_t file_id[FMT_FILE_ID_SIZE], uint64_t index,
		      const uint8_t random[FMT_V2_RANDOM_SIZE], const uint8_t *pt, size_t len, uint8_t *out,
		      uint8_t entry[FMT_V2_ENTRY_SIZE]);
int fmt_chunk_open_v2(const struct fmt_keys *keys, const uint8_t file_id[FMT_FILE_ID_SIZE], uint64_t index,
		      const uint8_t entry[FMT_V2_ENTRY_SIZE], const uint8_t *ct, size_t len, uint8_t *pt);

/* XAES-256-GCM itself (c2sp.org/XAES-256-GCM) under a raw 32-byte key: what v2 chunks of
 * cipher 2 use with the content key, here for its published test vectors. Seal (enc) writes len
 * bytes to out and the tag; open checks tag. Returns 0, -EBADMSG (open: does not authenticate)
 * or -EIO (libcrypto failed); out holds no plaintext on failure. */
int fmt_xaes_256_gcm(int enc, const uint8_t key[32], const uint8_t nonce[FMT_NONCE_SIZE], const uint8_t *ad,
		     size_t adlen, const uint8_t *in, size_t len, uint8_t *out, uint8_t tag[FMT_TAG_SIZE]);

/* Whether a v2 tag entry is a hole (32 zero bytes). */
bool fmt_v2_entry_is_hole(const uint8_t entry[FMT_V2_ENTRY_SIZE]);

/* Between fmt_chunk_hold and fmt_chunk_release (nested: the outermost release counts), the chunk
 * calls of this thread share one OpenSSL context instead of making one per chunk; it is freed
 * (wiped) at the release. Hold it for one request, never from one request to the next. */
void fmt_chunk_hold(void);
void fmt_chunk_release(void);

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

/* Size arithmetic takes the volume's layout (FMT_LAYOUT_V1 or FMT_LAYOUT_V2; anything else
 * counts as v1, the layout of volumes made before layouts existed). */

/* Bytes before the first chunk: 2048 (v1) or 4096 (v2). A file shorter than that but not empty
 * was cut inside its header area. */
uint64_t fmt_header_area(enum fmt_layout layout);

/* Plaintext size of a backing file of backing_size bytes. For a size no valid file has
 * (see fmt_backing_size_valid) this covers the cut last chunk too, at least one byte of it,
 * so a read reaches the damage and fails; inside the header area it is 0. */
uint64_t fmt_plain_size(enum fmt_layout layout, uint64_t backing_size);

/* True when backing_size is a size a well-formed keyfs file can have: 0 (no header yet), or the
 * header area plus full chunks plus an optional partial chunk: v1 more than its 40 overhead bytes,
 * v2 a tag page and at least one data byte after the whole groups. */
bool fmt_backing_size_valid(enum fmt_layout layout, uint64_t backing_size);

/* Backing size of a file holding plain_size plaintext bytes (at most fmt_max_plain_size). */
uint64_t fmt_backing_size(enum fmt_layout layout, uint64_t plain_size);

/* FMT_MAX_PLAIN_SIZE or FMT_V2_MAX_PLAIN_SIZE. */
uint64_t fmt_max_plain_size(enum fmt_layout layout);

/* Backing offset of v1 chunk index. */
static inline uint64_t fmt_chunk_offset(uint64_t index)
{
	return FMT_DATA_OFFSET + index * (uint64_t)FMT_CHUNK_DISK_SIZE;
}

/* Backing offset of the tag page of v2 group g. */
static inline uint64_t fmt_v2_group_offset(uint64_t group)
{
	return FMT_V2_HEADER_AREA + group * FMT_V2_GROUP_DISK;
}

/* Backing offset of the data page of v2 chunk index. */
static inline uint64_t fmt_v2_page_offset(uint64_t index)
{
	return fmt_v2_group_offset(index / FMT_V2_GROUP_CHUNKS) +
	       (1 + index % FMT_V2_GROUP_CHUNKS) * (uint64_t)FMT_V2_PAGE;
}

/* Backing offset of the tag entry of v2 chunk index. */
static inline uint64_t fmt_v2_entry_offset(uint64_t index)
{
	return fmt_v2_group_offset(index / FMT_V2_GROUP_CHUNKS) +
	       (index % FMT_V2_GROUP_CHUNKS) * (uint64_t)FMT_V2_ENTRY_SIZE;
}

/* Lower-case hex of a file id, as used in KMS associated data and by inspect. */
void fmt_file_id_hex(const uint8_t file_id[FMT_FILE_ID_SIZE], char out[2 * FMT_FILE_ID_SIZE + 1]);

/* Name of a cipher id ("xchacha20-poly1305", "xaes-256-gcm"), or NULL when unknown. */
const char *fmt_cipher_name(uint8_t cipher);

/* Whether files of layout may use cipher: XChaCha20-Poly1305 in both, XAES-256-GCM in v2 only. */
bool fmt_cipher_valid(uint8_t cipher, enum fmt_layout layout);

/* The cipher id of a name fmt_cipher_name gives, or 0. */
uint8_t fmt_cipher_by_name(const char *name);

/* Whether this process can seal and open chunks of cipher: always for XChaCha20-Poly1305
 * (libsodium), for XAES-256-GCM when libcrypto gives AES-256-ECB and AES-256-GCM. */
bool fmt_cipher_available(uint8_t cipher);

/* The cipher for the files of a new v2 volume: XAES-256-GCM where the CPU has AES and
 * carry-less multiply instructions and libcrypto gives it (constant time and about 1.5x
 * XChaCha20-Poly1305 there), else XChaCha20-Poly1305. */
uint8_t fmt_cipher_default(void);

#endif

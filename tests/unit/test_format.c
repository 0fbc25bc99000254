/* test_format.c: size arithmetic at every chunk boundary, header and chunk authentication, and the
 * chunk AEAD (HChaCha20 + OpenSSL ChaCha20-Poly1305) byte for byte against libsodium's XChaCha20-Poly1305.
 * secmem_init is not called (it belongs to keyclient): OpenSSL runs on its own allocators here. */
/* Cross-checked with Python: blake2b(key=dek, salt=LE64(id), person="keyfs-v1"). */
#define KDF_CONTENT_HEX "8227c93de20b4f523f007b0299303b0e4d17ddef233bf1e0a954291b80c3f56b"
#define KDF_HEADER_HEX "d4f25661cf082f1eb90be9674782e5d5023117a70963f9547894b8df424691c5"
#include <errno.h>
#include <stdlib.h>

#include <sodium.h>

#include "check.h"
#include "keyfs/format.h"

#define V1 FMT_LAYOUT_V1
#define V2 FMT_LAYOUT_V2
#define V2_KAT_CT "0919831cd5b7c486"
#define V2_KAT_ENTRY "303132333435363738393a3b3c3d3e3fdb90625bf18960c6b731b5964d638c20"
/* A cipher-2 chunk from DEK 00..1f; cross-checked with Python's cryptography (AES-ECB for the key
 * derivation, AESGCM), whose XAES also gives both C2SP vectors below. */
#define V2_XAES_KAT_CT "374665c79fd5ee80"
#define V2_XAES_KAT_ENTRY "303132333435363738393a3b3c3d3e3f26c4785256e9dc7f585f28ccd3e7dcf1"
/* blake2b(key=dek, salt=LE64(3), person="keyfs-v1"): the content key of a cipher-2 file. */
#define KDF_CONTENT_XAES_HEX "b23896ef70d4829e96307d186598363c05177de4a1f4c7ba712b8dc775d9c44d"

static void test_sizes(void)
{
	/* Worked examples of docs/FORMAT.md. */
	CHECK_EQ(fmt_backing_size(V1, 0), 2048);
	CHECK_EQ(fmt_backing_size(V1, 1), 2089);
	CHECK_EQ(fmt_backing_size(V1, 4095), 6183);
	CHECK_EQ(fmt_backing_size(V1, 4096), 6184);
	CHECK_EQ(fmt_backing_size(V1, 4097), 6225);
	CHECK_EQ(fmt_backing_size(V1, 1 << 20), 2048 + 256 * 4136);
	CHECK_EQ(fmt_backing_size(V1, 10ull << 30), 2048 + 2621440ull * 4136);
	CHECK_EQ(fmt_plain_size(V1, 0), 0);
	CHECK_EQ(fmt_plain_size(V1, 2048), 0);
	CHECK_EQ(fmt_plain_size(V1, 1024), 0);
	CHECK_EQ(fmt_plain_size(V1, 6184), 4096);

	/* Every plaintext size over four chunks round-trips, and every backing size in that range
	 * is either the image of exactly one plaintext size or invalid. */
	unsigned valid = 0;
	for (uint64_t p = 0; p <= 4 * 4096 + 1; p++) {
		uint64_t b = fmt_backing_size(V1, p);
		if (fmt_plain_size(V1, b) != p || !fmt_backing_size_valid(V1, b)) {
			CHECK_EQ(fmt_plain_size(V1, b), p);
			break;
		}
	}
	for (uint64_t b = 0; b <= 2048 + 4 * 4136; b++) {
		bool v = fmt_backing_size_valid(V1, b);
		valid += v;
		if (v && b && fmt_backing_size(V1, fmt_plain_size(V1, b)) != b) {
			CHECK_EQ(fmt_backing_size(V1, fmt_plain_size(V1, b)), b);
			break;
		}
	}
	/* Valid sizes: 0, the empty header-only file, and one per plaintext size 1..4*4096. */
	CHECK_EQ(valid, 2 + 4 * 4096);
	/* Invalid: inside the header, or a last chunk no longer than the overhead. */
	CHECK(!fmt_backing_size_valid(V1, 1));
	CHECK(!fmt_backing_size_valid(V1, 1024));       /* one slot is not a header area */
	CHECK(!fmt_backing_size_valid(V1, 2047));
	CHECK(fmt_backing_size_valid(V1, 2048));
	CHECK(!fmt_backing_size_valid(V1, 2049));
	CHECK(!fmt_backing_size_valid(V1, 2088));
	CHECK(fmt_backing_size_valid(V1, 2089));
	CHECK(!fmt_backing_size_valid(V1, 6184 + 40));
	/* A cut inside a chunk's overhead counts as one byte of that chunk, so a read reaches
	 * it and fails, chunk 0 included; a cut inside the header area is size 0. */
	CHECK_EQ(fmt_plain_size(V1, 6184 + 40), 4097);
	CHECK_EQ(fmt_plain_size(V1, 6184 + 1), 4097);
	CHECK_EQ(fmt_plain_size(V1, 2049), 1);
	CHECK_EQ(fmt_plain_size(V1, 2048 + 24), 1);
	CHECK_EQ(fmt_plain_size(V1, 2088), 1);
	CHECK_EQ(fmt_plain_size(V1, 2089), 1);
	CHECK_EQ(fmt_plain_size(V1, 2090), 2);
	CHECK_EQ(fmt_plain_size(V1, 2047), 0);
	CHECK_EQ(fmt_generation_next(1), 2);
	CHECK_EQ(fmt_generation_next(UINT32_MAX - 1), UINT32_MAX);
	CHECK_EQ(fmt_generation_next(UINT32_MAX), 1);
	CHECK_EQ(fmt_chunk_offset(0), 2048);
	CHECK_EQ(fmt_chunk_offset(3), 2048 + 3 * 4136);
	CHECK_EQ(fmt_header_offset(0), 0);
	CHECK_EQ(fmt_header_offset(1), 1024);
	CHECK(fmt_backing_size(V1, FMT_MAX_PLAIN_SIZE) <= (uint64_t)INT64_MAX);
}

static void make_header(struct fmt_header *h, struct fmt_keys *keys)
{
	uint8_t dek[32];

	for (int i = 0; i < 32; i++)
		dek[i] = (uint8_t)i;
	CHECK_EQ(fmt_keys_derive(dek, FMT_CIPHER_XCHACHA20_POLY1305, keys), 0);
	memset(h, 0, sizeof(*h));
	for (int i = 0; i < 16; i++)
		h->file_id[i] = (uint8_t)(0xa0 + i);
	strcpy(h->key_id, "0b5b4d0e-6c0a-4a8f-9d6e-3f1c2b7a9e10");
	strcpy(h->key_version, "1");
	h->generation = 7;
	h->wrapped_len = 77;
	memset(h->wrapped, 0x5a, h->wrapped_len);
}

static void test_kdf_known_answer(void)
{
	/* Freezes the key derivation: a change here breaks every existing volume. */
	struct fmt_keys keys;
	struct fmt_header h;
	char hex[65];

	make_header(&h, &keys);
	sodium_bin2hex(hex, sizeof(hex), keys.content, 32);
	CHECK(strcmp(hex, KDF_CONTENT_HEX) == 0);
	if (strcmp(hex, KDF_CONTENT_HEX) != 0)
		fprintf(stderr, "content key: %s\n", hex);
	sodium_bin2hex(hex, sizeof(hex), keys.header, 32);
	CHECK(strcmp(hex, KDF_HEADER_HEX) == 0);
	if (strcmp(hex, KDF_HEADER_HEX) != 0)
		fprintf(stderr, "header key: %s\n", hex);
}

static void test_header(void)
{
	struct fmt_keys keys, other;
	struct fmt_header h, p;
	uint8_t buf[FMT_HEADER_SIZE], bad[FMT_HEADER_SIZE], dek2[32] = { 1 };

	make_header(&h, &keys);
	CHECK_EQ(fmt_header_encode(&h, &keys, buf), 0);
	CHECK_MEM(buf, "KEYFSHDR", 8);
	CHECK_EQ(buf[8], 1);
	CHECK_EQ(buf[10], 1);
	CHECK_EQ(buf[11], 12);
	CHECK_EQ(fmt_header_parse(buf, &p), 0);
	CHECK_EQ(p.version, 1);
	CHECK_EQ(p.generation, 7);
	CHECK_EQ(buf[36], 7);
	CHECK_EQ(p.chunk_size, 4096);
	CHECK_MEM(p.file_id, h.file_id, 16);
	CHECK(strcmp(p.key_id, h.key_id) == 0);
	CHECK(strcmp(p.key_version, "1") == 0);
	CHECK_EQ(p.wrapped_len, 77);
	CHECK_MEM(p.wrapped, h.wrapped, 77);
	CHECK_EQ(fmt_header_verify(buf, &keys), 0);
	CHECK_EQ(fmt_keys_derive(dek2, FMT_CIPHER_XCHACHA20_POLY1305, &other), 0);
	CHECK_EQ(fmt_header_verify(buf, &other), -EBADMSG);

	/* Every single flipped bit anywhere in the header is caught by parse or by the tag. */
	unsigned caught = 0;
	for (int i = 0; i < FMT_HEADER_SIZE; i++) {
		memcpy(bad, buf, sizeof(buf));
		bad[i] ^= 0x01;
		if (fmt_header_parse(bad, &p) < 0 || fmt_header_verify(bad, &keys) < 0)
			caught++;
	}
	CHECK_EQ(caught, FMT_HEADER_SIZE);

	/* Version 2 (a v2 file) parses; 3 is unknown. The encoder writes 2 only when asked. */
	memcpy(bad, buf, sizeof(buf));
	bad[8] = 2;
	CHECK_EQ(fmt_header_parse(bad, &p), 0);
	CHECK_EQ(p.version, 2);
	bad[8] = 3;
	CHECK_EQ(fmt_header_parse(bad, &p), -EPROTONOSUPPORT);
	bad[8] = 0;
	CHECK_EQ(fmt_header_parse(bad, &p), -EPROTONOSUPPORT);
	{
		struct fmt_header h2 = h;
		uint8_t b2[FMT_HEADER_SIZE];

		h2.version = 2;
		CHECK_EQ(fmt_header_encode(&h2, &keys, b2), 0);
		CHECK_EQ(b2[8], 2);
		CHECK_EQ(fmt_header_parse(b2, &p), 0);
		CHECK_EQ(p.version, 2);
		CHECK_EQ(fmt_header_verify(b2, &keys), 0);
		h2.version = 0;
		CHECK_EQ(fmt_header_encode(&h2, &keys, b2), 0);
		CHECK_EQ(b2[8], 1);
	}
	memcpy(bad, buf, sizeof(buf));
	bad[10] = 7;
	CHECK_EQ(fmt_header_parse(bad, &p), -EPROTONOSUPPORT);
	memcpy(bad, buf, sizeof(buf));
	bad[34] = 0xff;
	bad[35] = 0xff;
	CHECK_EQ(fmt_header_parse(bad, &p), -EBADMSG);
	memcpy(bad, buf, sizeof(buf));
	memset(bad + 36, 0, 4);                 /* generation 0 never exists */
	CHECK_EQ(fmt_header_parse(bad, &p), -EBADMSG);

	/* Encode refuses what parse would refuse. */
	h.wrapped_len = FMT_WRAPPED_MAX + 1;
	CHECK_EQ(fmt_header_encode(&h, &keys, buf), -EINVAL);
	h.wrapped_len = 77;
	h.generation = 0;
	CHECK_EQ(fmt_header_encode(&h, &keys, buf), -EINVAL);
	h.generation = 1;
	h.key_id[0] = '\0';
	CHECK_EQ(fmt_header_encode(&h, &keys, buf), -EINVAL);
	strcpy(h.key_id, "has space");
	CHECK_EQ(fmt_header_encode(&h, &keys, buf), -EINVAL);
	strcpy(h.key_id, "k");
	memset(h.file_id, 0, 16);
	CHECK_EQ(fmt_header_encode(&h, &keys, buf), -EINVAL);
	/* Largest fields fit. */
	for (int i = 0; i < 16; i++)
		h.file_id[i] = (uint8_t)(i + 1);
	memset(h.key_id, 'k', FMT_KEY_ID_MAX);
	h.key_id[FMT_KEY_ID_MAX] = '\0';
	memset(h.key_version, 'v', FMT_KEY_VERSION_MAX);
	h.key_version[FMT_KEY_VERSION_MAX] = '\0';
	h.wrapped_len = FMT_WRAPPED_MAX;
	CHECK_EQ(fmt_header_encode(&h, &keys, buf), 0);
	CHECK_EQ(fmt_header_parse(buf, &p), 0);
	CHECK_EQ(strlen(p.key_id), FMT_KEY_ID_MAX);
	CHECK_EQ(p.wrapped_len, FMT_WRAPPED_MAX);
}

static void test_chunks(void)
{
	struct fmt_keys keys;
	struct fmt_header h;
	uint8_t pt[4096], out[4096], ct[FMT_CHUNK_DISK_SIZE], nonce[24], other_id[16];

	make_header(&h, &keys);
	randombytes_buf(pt, sizeof(pt));
	randombytes_buf(nonce, sizeof(nonce));
	for (size_t len = 1; len <= 4096; len += len < 64 ? 1 : 509) {
		CHECK_EQ(fmt_chunk_seal(&keys, h.file_id, 7, nonce, pt, len, ct), 0);
		CHECK_MEM(ct, nonce, 24);
		CHECK_EQ(fmt_chunk_open(&keys, h.file_id, 7, ct, len + 40, out), (long long)len);
		CHECK_MEM(out, pt, len);
	}
	CHECK_EQ(fmt_chunk_seal(&keys, h.file_id, 7, nonce, pt, 4096, ct), 0);
	CHECK_EQ(fmt_chunk_open(&keys, h.file_id, 8, ct, sizeof(ct), out), -EBADMSG);
	memcpy(other_id, h.file_id, 16);
	other_id[15] ^= 1;
	CHECK_EQ(fmt_chunk_open(&keys, other_id, 7, ct, sizeof(ct), out), -EBADMSG);
	CHECK_EQ(fmt_chunk_open(&keys, h.file_id, 7, ct, sizeof(ct) - 1, out), -EBADMSG);
	ct[100] ^= 0x80;
	CHECK_EQ(fmt_chunk_open(&keys, h.file_id, 7, ct, sizeof(ct), out), -EBADMSG);
	CHECK(sodium_is_zero(out, 4096));       /* no plaintext left behind on failure */
	ct[100] ^= 0x80;
	ct[5] ^= 0x01;                          /* nonce */
	CHECK_EQ(fmt_chunk_open(&keys, h.file_id, 7, ct, sizeof(ct), out), -EBADMSG);

	/* A full all-zero chunk is a hole; a partial one is not. */
	memset(ct, 0, sizeof(ct));
	memset(out, 0xff, sizeof(out));
	CHECK_EQ(fmt_chunk_open(&keys, h.file_id, 3, ct, sizeof(ct), out), 4096);
	CHECK(sodium_is_zero(out, 4096));
	CHECK_EQ(fmt_chunk_open(&keys, h.file_id, 3, ct, 100, out), -EBADMSG);
	CHECK_EQ(fmt_chunk_open(&keys, h.file_id, 3, ct, 40, out), -EBADMSG);
	CHECK_EQ(fmt_chunk_seal(&keys, h.file_id, 0, nonce, pt, 0, ct), -EINVAL);
	CHECK_EQ(fmt_chunk_seal(&keys, h.file_id, 0, nonce, pt, 4097, ct), -EINVAL);
}

/* libsodium's crypto_aead_xchacha20poly1305_ietf_encrypt, laid out as a v1 chunk: the reference. */
static void reference_seal(const struct fmt_keys *keys, const uint8_t file_id[16], uint64_t index,
			   const uint8_t nonce[24], const uint8_t *pt, size_t len, uint8_t *out)
{
	uint8_t ad[24];
	unsigned long long clen;

	memcpy(ad, file_id, 16);
	for (int i = 0; i < 8; i++)
		ad[16 + i] = (uint8_t)(index >> (8 * i));
	memcpy(out, nonce, 24);
	crypto_aead_xchacha20poly1305_ietf_encrypt(out + 24, &clen, pt, len, ad, sizeof(ad), NULL, nonce, keys->content);
}

static int reference_open(const struct fmt_keys *keys, const uint8_t file_id[16], uint64_t index,
			  const uint8_t *ct, size_t ctlen, uint8_t *pt)
{
	uint8_t ad[24];
	unsigned long long plen;

	memcpy(ad, file_id, 16);
	for (int i = 0; i < 8; i++)
		ad[16 + i] = (uint8_t)(index >> (8 * i));
	if (crypto_aead_xchacha20poly1305_ietf_decrypt(pt, &plen, NULL, ct + 24, ctlen - 24, ad, sizeof(ad), ct,
						       keys->content) != 0)
		return -1;
	return (int)plen;
}

/* The OpenSSL path writes exactly libsodium's bytes, each opens the other's, and a forgery leaves
 * no plaintext: random keys, file ids, indexes, nonces and lengths, the boundaries included. */
static void test_chunk_impl_matches_libsodium(void)
{
	static const size_t edge[] = { 1, 15, 16, 17, 63, 64, 65, 255, 256, 257, 511, 512, 4095, 4096 };
	struct fmt_keys keys;
	uint8_t pt[4096], out[4096], mine[FMT_CHUNK_DISK_SIZE], ref[FMT_CHUNK_DISK_SIZE], nonce[24], id[16];
	unsigned bad_bytes = 0, bad_opens = 0, bad_tamper = 0, left_plain = 0;

	CHECK(strcmp(fmt_chunk_impl(), "openssl") == 0);
	for (int i = 0; i < 600; i++) {
		size_t len = i < (int)(sizeof(edge) / sizeof(edge[0])) ? edge[i] : 1 + randombytes_uniform(4096);
		uint64_t index;
		size_t flip;

		randombytes_buf(&keys, sizeof(keys));
		randombytes_buf(id, sizeof(id));
		randombytes_buf(&index, sizeof(index));
		randombytes_buf(nonce, sizeof(nonce));
		randombytes_buf(pt, len);
		if (i % 3 == 0)
			index %= 1000;
		CHECK_EQ(fmt_chunk_seal(&keys, id, index, nonce, pt, len, mine), 0);
		reference_seal(&keys, id, index, nonce, pt, len, ref);
		bad_bytes += memcmp(mine, ref, len + 40) != 0;
		memset(out, 0xaa, sizeof(out));
		bad_opens += fmt_chunk_open(&keys, id, index, ref, len + 40, out) != (int)len || memcmp(out, pt, len);
		memset(out, 0xaa, sizeof(out));
		bad_opens += reference_open(&keys, id, index, mine, len + 40, out) != (int)len || memcmp(out, pt, len);

		/* One flipped bit anywhere (nonce, ciphertext, tag) fails both ways, and leaves pt zeroed. */
		flip = randombytes_uniform((uint32_t)(len + 40));
		mine[flip] ^= (uint8_t)(1u << randombytes_uniform(8));
		memset(out, 0xaa, sizeof(out));
		bad_tamper += fmt_chunk_open(&keys, id, index, mine, len + 40, out) != -EBADMSG;
		left_plain += !sodium_is_zero(out, len);
		bad_tamper += reference_open(&keys, id, index, mine, len + 40, out) != -1;
		/* The wrong position or file fails too. */
		memset(out, 0xaa, sizeof(out));
		bad_tamper += fmt_chunk_open(&keys, id, index ^ 1, ref, len + 40, out) != -EBADMSG;
		left_plain += !sodium_is_zero(out, len);
		id[randombytes_uniform(16)] ^= 0x10;
		bad_tamper += fmt_chunk_open(&keys, id, index, ref, len + 40, out) != -EBADMSG;
		left_plain += !sodium_is_zero(out, len);
	}
	CHECK_EQ(bad_bytes, 0);
	CHECK_EQ(bad_opens, 0);
	CHECK_EQ(bad_tamper, 0);
	CHECK_EQ(left_plain, 0);
}

/* v2 sizes: a 4096-byte header page, then groups of a tag page and 128 data pages (docs/FORMAT.md). */
static void test_sizes_v2(void)
{
	const uint64_t G = 129 * 4096ull, P = 128 * 4096ull;

	CHECK_EQ(fmt_header_area(V2), 4096);
	CHECK_EQ(fmt_header_area(V1), 2048);
	CHECK_EQ(fmt_backing_size(V2, 0), 4096);
	CHECK_EQ(fmt_backing_size(V2, 1), 8193);
	CHECK_EQ(fmt_backing_size(V2, 4095), 12287);
	CHECK_EQ(fmt_backing_size(V2, 4096), 12288);
	CHECK_EQ(fmt_backing_size(V2, 4097), 12289);
	CHECK_EQ(fmt_backing_size(V2, 512 << 10), 4096 + G);
	CHECK_EQ(fmt_backing_size(V2, (512 << 10) + 1), 4096 + G + 4097);
	CHECK_EQ(fmt_backing_size(V2, 1 << 20), 1060864);
	CHECK_EQ(fmt_backing_size(V2, 1ull << 30), 1082134528);
	CHECK_EQ(fmt_backing_size(V2, 10ull << 30), 4096 + 20480 * G);
	CHECK_EQ(fmt_plain_size(V2, 0), 0);
	CHECK_EQ(fmt_plain_size(V2, 4096), 0);
	CHECK_EQ(fmt_plain_size(V2, 12288), 4096);
	CHECK_EQ(fmt_plain_size(V2, 4096 + G), P);
	/* A cut inside the header page is size 0; inside (or right after) a tag page, one byte of
	 * its first chunk; inside a data page, the bytes left. */
	CHECK_EQ(fmt_plain_size(V2, 2048), 0);
	CHECK(!fmt_backing_size_valid(V2, 2048));
	CHECK(!fmt_backing_size_valid(V2, 4095));
	CHECK(fmt_backing_size_valid(V2, 4096));
	CHECK(!fmt_backing_size_valid(V2, 4097));
	CHECK(!fmt_backing_size_valid(V2, 8192));
	CHECK(fmt_backing_size_valid(V2, 8193));
	CHECK_EQ(fmt_plain_size(V2, 4097), 1);
	CHECK_EQ(fmt_plain_size(V2, 8192), 1);
	CHECK_EQ(fmt_plain_size(V2, 8193), 1);
	CHECK_EQ(fmt_plain_size(V2, 4096 + G + 1), P + 1);
	CHECK_EQ(fmt_plain_size(V2, 4096 + G + 4096), P + 1);
	CHECK(!fmt_backing_size_valid(V2, 4096 + G + 4096));
	CHECK(fmt_backing_size_valid(V2, 4096 + G + 4097));
	CHECK_EQ(fmt_plain_size(V2, 4096 + G + 4097), P + 1);

	/* Round trips over three groups; every valid size is the image of one plaintext size. */
	for (uint64_t p = 0; p <= 3 * P + 5; p += p < 20 || p % 4096 > 4090 || p % 4096 < 5 ? 1 : 4000) {
		uint64_t b = fmt_backing_size(V2, p);
		if (fmt_plain_size(V2, b) != p || !fmt_backing_size_valid(V2, b)) {
			CHECK_EQ(fmt_plain_size(V2, b), p);
			break;
		}
	}
	unsigned valid = 0;
	for (uint64_t b = 0; b <= 4096 + 2 * G; b++) {
		bool v = fmt_backing_size_valid(V2, b);
		valid += v;
		if (v && b && fmt_backing_size(V2, fmt_plain_size(V2, b)) != b) {
			CHECK_EQ(fmt_backing_size(V2, fmt_plain_size(V2, b)), b);
			break;
		}
	}
	CHECK_EQ(valid, 2 + 2 * P);
	CHECK_EQ(fmt_v2_group_offset(0), 4096);
	CHECK_EQ(fmt_v2_page_offset(0), 8192);
	CHECK_EQ(fmt_v2_page_offset(127), 8192 + 127 * 4096);
	CHECK_EQ(fmt_v2_page_offset(128), 4096 + G + 4096);
	CHECK_EQ(fmt_v2_entry_offset(0), 4096);
	CHECK_EQ(fmt_v2_entry_offset(5), 4096 + 5 * 32);
	CHECK_EQ(fmt_v2_entry_offset(130), 4096 + G + 2 * 32);
	CHECK(fmt_backing_size(V2, FMT_V2_MAX_PLAIN_SIZE) <= (uint64_t)INT64_MAX);
	CHECK(fmt_backing_size(V2, FMT_V2_MAX_PLAIN_SIZE) > (uint64_t)INT64_MAX - G);
	CHECK_EQ(fmt_max_plain_size(V2), FMT_V2_MAX_PLAIN_SIZE);
	CHECK_EQ(fmt_max_plain_size(V1), FMT_MAX_PLAIN_SIZE);
}

/* v2 chunks: libsodium's XChaCha20-Poly1305 (detached) with nonce random || index and associated
 * data file id || index || 2 is the reference; one frozen known answer pins the bytes. */
/* The v2 known answer's inputs (file id 20..2f, chunk 5, random 30..3f, "keyfs v2") sealed with
 * keys: the ciphertext and the entry must be the frozen ones (docs/FORMAT.md). */
static void v2_known_answer(const struct fmt_keys *keys, const char *what, const char *ct_hex, const char *entry_hex)
{
	uint8_t id[16], rnd[16], ct[8], e[32];
	char hex[2 * 32 + 1];

	for (int k = 0; k < 16; k++) {
		id[k] = (uint8_t)(0x20 + k);
		rnd[k] = (uint8_t)(0x30 + k);
	}
	CHECK_EQ(fmt_chunk_seal_v2(keys, id, 5, rnd, (const uint8_t *)"keyfs v2", 8, ct, e), 0);
	sodium_bin2hex(hex, sizeof(hex), ct, 8);
	printf("%s known answer ciphertext %s\n", what, hex);
	CHECK(strcmp(hex, ct_hex) == 0);
	sodium_bin2hex(hex, sizeof(hex), e, 32);
	printf("%s known answer entry %s\n", what, hex);
	CHECK(strcmp(hex, entry_hex) == 0);
}

/*
 * 300 random v2 chunks of cipher: each is the cipher's AEAD (libsodium's XChaCha20-Poly1305, or
 * XAES-256-GCM itself) of the content key, nonce random || index and the v2 associated data; it
 * opens in place, and not at another position, in another file, under the other cipher, with a
 * bit of its entry or data flipped, or shorter (the output then zeroed). Some run inside a hold,
 * as requests do.
 */
static void v2_round_trips(uint8_t cipher)
{
	struct fmt_keys keys, other;
	uint8_t pt[4096], ct[4096], out[4096], e[32], ref[4096], rtag[16], rnd[16], id[16], nonce[24], ad[25], dek[32];
	unsigned long long tl;
	unsigned bad = 0;

	for (int i = 0; i < 300; i++) {
		size_t len = i < 3 ? (size_t[]){ 1, 4095, 4096 }[i] : 1 + randombytes_uniform(4096);
		uint64_t index = i % 2 ? randombytes_random() : ((uint64_t)randombytes_random() << 32) | randombytes_random();

		randombytes_buf(dek, sizeof(dek));
		CHECK_EQ(fmt_keys_derive(dek, cipher, &keys), 0);
		randombytes_buf(id, 16);
		randombytes_buf(rnd, 16);
		randombytes_buf(pt, len);
		if (i % 3 == 0)
			fmt_chunk_hold();
		CHECK_EQ(fmt_chunk_seal_v2(&keys, id, index, rnd, pt, len, ct, e), 0);
		memcpy(nonce, rnd, 16);
		memcpy(ad, id, 16);
		for (int k = 0; k < 8; k++)
			nonce[16 + k] = ad[16 + k] = (uint8_t)(index >> (8 * k));
		ad[24] = 2;
		if (cipher == FMT_CIPHER_XAES_256_GCM)
			CHECK_EQ(fmt_xaes_256_gcm(1, keys.content, nonce, ad, 25, pt, len, ref, rtag), 0);
		else
			crypto_aead_xchacha20poly1305_ietf_encrypt_detached(ref, rtag, &tl, pt, len, ad, 25, NULL, nonce,
									    keys.content);
		bad += memcmp(ct, ref, len) != 0 || memcmp(e, rnd, 16) != 0 || memcmp(e + 16, rtag, 16) != 0;
		/* In place, as reads do. */
		memcpy(out, ct, len);
		bad += fmt_chunk_open_v2(&keys, id, index, e, out, len, out) != (int)len || memcmp(out, pt, len) != 0;
		bad += fmt_chunk_open_v2(&keys, id, index + 1, e, ct, len, out) != -EBADMSG;
		bad += !sodium_is_zero(out, len);
		id[3] ^= 4;
		bad += fmt_chunk_open_v2(&keys, id, index, e, ct, len, out) != -EBADMSG;
		id[3] ^= 4;
		other = keys;
		other.cipher = cipher == FMT_CIPHER_XAES_256_GCM ? FMT_CIPHER_XCHACHA20_POLY1305 : FMT_CIPHER_XAES_256_GCM;
		bad += fmt_chunk_open_v2(&other, id, index, e, ct, len, out) != -EBADMSG;
		e[randombytes_uniform(32)] ^= 0x20;
		bad += fmt_chunk_open_v2(&keys, id, index, e, ct, len, out) != -EBADMSG;
		CHECK_EQ(fmt_chunk_seal_v2(&keys, id, index, rnd, pt, len, ct, e), 0);
		ct[randombytes_uniform((uint32_t)len)] ^= 1;
		bad += fmt_chunk_open_v2(&keys, id, index, e, ct, len, out) != -EBADMSG;
		bad += !sodium_is_zero(out, len);
		if (len > 1)
			bad += fmt_chunk_open_v2(&keys, id, index, e, ref, len - 1, out) != -EBADMSG;
		if (i % 3 == 0)
			fmt_chunk_release();
	}
	CHECK_EQ(bad, 0);

	/* A zero entry: a full chunk reads as zeros whatever the page holds; a partial one fails. */
	memset(e, 0, 32);
	memset(ct, 0x5a, sizeof(ct));
	CHECK(fmt_v2_entry_is_hole(e));
	CHECK_EQ(fmt_chunk_open_v2(&keys, id, 9, e, ct, 4096, out), 4096);
	CHECK(sodium_is_zero(out, 4096));
	CHECK_EQ(fmt_chunk_open_v2(&keys, id, 9, e, ct, 100, out), -EBADMSG);
	CHECK_EQ(fmt_chunk_seal_v2(&keys, id, 0, rnd, pt, 0, ct, e), -EINVAL);
	CHECK_EQ(fmt_chunk_seal_v2(&keys, id, 0, rnd, pt, 4097, ct, e), -EINVAL);
}

static void test_chunks_v2(void)
{
	struct fmt_keys keys;

	v2_round_trips(FMT_CIPHER_XCHACHA20_POLY1305);
	/* Known answer with content key bytes 00..1f. */
	memset(&keys, 0, sizeof(keys));
	keys.cipher = FMT_CIPHER_XCHACHA20_POLY1305;
	for (int k = 0; k < 32; k++)
		keys.content[k] = (uint8_t)k;
	v2_known_answer(&keys, "v2", V2_KAT_CT, V2_KAT_ENTRY);
}

/* The two vectors of c2sp.org/XAES-256-GCM, sealed and opened, and a flipped bit refused. */
static void test_xaes_vectors(void)
{
	static const struct {
		uint8_t key;
		const char *ad, *ct_tag;
	} v[] = {
		{ 0x01, "", "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271" },
		{ 0x03, "c2sp.org/XAES-256-GCM", "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d" },
	};
	const uint8_t *nonce = (const uint8_t *)"ABCDEFGHIJKLMNOPQRSTUVWX", *pt = (const uint8_t *)"XAES-256-GCM";

	for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
		uint8_t key[32], out[12], back[12], tag[16];
		char hex[2 * 28 + 1];

		memset(key, v[i].key, sizeof(key));
		CHECK_EQ(fmt_xaes_256_gcm(1, key, nonce, (const uint8_t *)v[i].ad, strlen(v[i].ad), pt, 12, out, tag), 0);
		sodium_bin2hex(hex, 2 * 12 + 1, out, 12);
		sodium_bin2hex(hex + 24, 2 * 16 + 1, tag, 16);
		CHECK(strcmp(hex, v[i].ct_tag) == 0);
		if (strcmp(hex, v[i].ct_tag) != 0)
			fprintf(stderr, "xaes vector %zu: %s\n", i, hex);
		CHECK_EQ(fmt_xaes_256_gcm(0, key, nonce, (const uint8_t *)v[i].ad, strlen(v[i].ad), out, 12, back, tag), 0);
		CHECK_MEM(back, pt, 12);
		tag[15] ^= 0x80;
		CHECK_EQ(fmt_xaes_256_gcm(0, key, nonce, (const uint8_t *)v[i].ad, strlen(v[i].ad), out, 12, back, tag),
			 -EBADMSG);
		CHECK(sodium_is_zero(back, 12));
	}
}

/* v2 chunks of cipher 2, with a content key of their own (KDF id 3), bound to file and position
 * like cipher 1's. */
static void test_chunks_v2_xaes(void)
{
	struct fmt_keys keys, k1;
	uint8_t dek[32];
	char hex[65];

	for (int i = 0; i < 32; i++)
		dek[i] = (uint8_t)i;
	CHECK_EQ(fmt_keys_derive(dek, FMT_CIPHER_XAES_256_GCM, &keys), 0);
	CHECK_EQ(keys.cipher, FMT_CIPHER_XAES_256_GCM);
	sodium_bin2hex(hex, sizeof(hex), keys.content, 32);
	CHECK(strcmp(hex, KDF_CONTENT_XAES_HEX) == 0);
	CHECK_EQ(fmt_keys_derive(dek, FMT_CIPHER_XCHACHA20_POLY1305, &k1), 0);
	CHECK(memcmp(k1.content, keys.content, 32) != 0);
	CHECK_MEM(k1.header, keys.header, 32);
	CHECK_EQ(fmt_keys_derive(dek, 3, &k1), -EINVAL);
	/* Known answer, end to end from DEK 00..1f (content key KDF_CONTENT_XAES_HEX). */
	v2_known_answer(&keys, "v2 xaes", V2_XAES_KAT_CT, V2_XAES_KAT_ENTRY);
	v2_round_trips(FMT_CIPHER_XAES_256_GCM);
}

/* A v2 header names cipher 2 under its MAC; a v1 header cannot. */
static void test_header_xaes(void)
{
	struct fmt_keys keys;
	struct fmt_header h, p;
	uint8_t buf[FMT_HEADER_SIZE], dek[32];

	for (int i = 0; i < 32; i++)
		dek[i] = (uint8_t)i;
	make_header(&h, &keys);
	CHECK_EQ(fmt_keys_derive(dek, FMT_CIPHER_XAES_256_GCM, &keys), 0);
	CHECK_EQ(fmt_header_encode(&h, &keys, buf), -EINVAL);   /* h.version 0: a v1 file */
	h.version = 2;
	CHECK_EQ(fmt_header_encode(&h, &keys, buf), 0);
	CHECK_EQ(buf[8], 2);
	CHECK_EQ(buf[10], 2);
	CHECK_EQ(fmt_header_parse(buf, &p), 0);
	CHECK_EQ(p.cipher, FMT_CIPHER_XAES_256_GCM);
	CHECK_EQ(fmt_header_verify(buf, &keys), 0);
	/* Naming the other cipher breaks the MAC: no one swaps a file's cipher. */
	buf[10] = 1;
	CHECK_EQ(fmt_header_parse(buf, &p), 0);
	CHECK_EQ(fmt_header_verify(buf, &keys), -EBADMSG);
	/* Cipher 2 in a v1 header, or an unknown cipher: not this format. */
	buf[10] = 2;
	buf[8] = 1;
	CHECK_EQ(fmt_header_parse(buf, &p), -EPROTONOSUPPORT);
	buf[8] = 2;
	buf[10] = 3;
	CHECK_EQ(fmt_header_parse(buf, &p), -EPROTONOSUPPORT);
}

int main(void)
{
	if (sodium_init() < 0)
		return 2;
	test_sizes();
	test_sizes_v2();
	test_chunks_v2();
	test_kdf_known_answer();
	test_header();
	test_chunks();
	test_chunk_impl_matches_libsodium();
	test_xaes_vectors();
	test_chunks_v2_xaes();
	test_header_xaes();
	CHECK(strcmp(fmt_cipher_name(1), "xchacha20-poly1305") == 0);
	CHECK(strcmp(fmt_cipher_name(2), "xaes-256-gcm") == 0);
	CHECK(fmt_cipher_name(3) == NULL);
	CHECK_EQ(fmt_cipher_by_name("xaes-256-gcm"), 2);
	CHECK_EQ(fmt_cipher_by_name("xchacha20-poly1305"), 1);
	CHECK_EQ(fmt_cipher_by_name("aes-256-gcm"), 0);
	CHECK(fmt_cipher_available(1) && fmt_cipher_available(2) && !fmt_cipher_available(3));
	return check_done();
}

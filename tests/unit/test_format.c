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

static void test_sizes(void)
{
	/* Worked examples of docs/FORMAT.md. */
	CHECK_EQ(fmt_backing_size(0), 2048);
	CHECK_EQ(fmt_backing_size(1), 2089);
	CHECK_EQ(fmt_backing_size(4095), 6183);
	CHECK_EQ(fmt_backing_size(4096), 6184);
	CHECK_EQ(fmt_backing_size(4097), 6225);
	CHECK_EQ(fmt_backing_size(1 << 20), 2048 + 256 * 4136);
	CHECK_EQ(fmt_backing_size(10ull << 30), 2048 + 2621440ull * 4136);
	CHECK_EQ(fmt_plain_size(0), 0);
	CHECK_EQ(fmt_plain_size(2048), 0);
	CHECK_EQ(fmt_plain_size(1024), 0);
	CHECK_EQ(fmt_plain_size(6184), 4096);

	/* Every plaintext size over four chunks round-trips, and every backing size in that range
	 * is either the image of exactly one plaintext size or invalid. */
	unsigned valid = 0;
	for (uint64_t p = 0; p <= 4 * 4096 + 1; p++) {
		uint64_t b = fmt_backing_size(p);
		if (fmt_plain_size(b) != p || !fmt_backing_size_valid(b)) {
			CHECK_EQ(fmt_plain_size(b), p);
			break;
		}
	}
	for (uint64_t b = 0; b <= 2048 + 4 * 4136; b++) {
		bool v = fmt_backing_size_valid(b);
		valid += v;
		if (v && b && fmt_backing_size(fmt_plain_size(b)) != b) {
			CHECK_EQ(fmt_backing_size(fmt_plain_size(b)), b);
			break;
		}
	}
	/* Valid sizes: 0, the empty header-only file, and one per plaintext size 1..4*4096. */
	CHECK_EQ(valid, 2 + 4 * 4096);
	/* Invalid: inside the header, or a last chunk no longer than the overhead. */
	CHECK(!fmt_backing_size_valid(1));
	CHECK(!fmt_backing_size_valid(1024));       /* one slot is not a header area */
	CHECK(!fmt_backing_size_valid(2047));
	CHECK(fmt_backing_size_valid(2048));
	CHECK(!fmt_backing_size_valid(2049));
	CHECK(!fmt_backing_size_valid(2088));
	CHECK(fmt_backing_size_valid(2089));
	CHECK(!fmt_backing_size_valid(6184 + 40));
	/* A cut inside a chunk's overhead counts as one byte of that chunk, so a read reaches
	 * it and fails, chunk 0 included; a cut inside the header area is size 0. */
	CHECK_EQ(fmt_plain_size(6184 + 40), 4097);
	CHECK_EQ(fmt_plain_size(6184 + 1), 4097);
	CHECK_EQ(fmt_plain_size(2049), 1);
	CHECK_EQ(fmt_plain_size(2048 + 24), 1);
	CHECK_EQ(fmt_plain_size(2088), 1);
	CHECK_EQ(fmt_plain_size(2089), 1);
	CHECK_EQ(fmt_plain_size(2090), 2);
	CHECK_EQ(fmt_plain_size(2047), 0);
	CHECK_EQ(fmt_generation_next(1), 2);
	CHECK_EQ(fmt_generation_next(UINT32_MAX - 1), UINT32_MAX);
	CHECK_EQ(fmt_generation_next(UINT32_MAX), 1);
	CHECK_EQ(fmt_chunk_offset(0), 2048);
	CHECK_EQ(fmt_chunk_offset(3), 2048 + 3 * 4136);
	CHECK_EQ(fmt_header_offset(0), 0);
	CHECK_EQ(fmt_header_offset(1), 1024);
	CHECK(fmt_backing_size(FMT_MAX_PLAIN_SIZE) <= (uint64_t)INT64_MAX);
}

static void make_header(struct fmt_header *h, struct fmt_keys *keys)
{
	uint8_t dek[32];

	for (int i = 0; i < 32; i++)
		dek[i] = (uint8_t)i;
	fmt_keys_derive(dek, keys);
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
	fmt_keys_derive(dek2, &other);
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

	memcpy(bad, buf, sizeof(buf));
	bad[8] = 2;
	CHECK_EQ(fmt_header_parse(bad, &p), -EPROTONOSUPPORT);
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

int main(void)
{
	if (sodium_init() < 0)
		return 2;
	test_sizes();
	test_kdf_known_answer();
	test_header();
	test_chunks();
	test_chunk_impl_matches_libsodium();
	CHECK(strcmp(fmt_cipher_name(1), "xchacha20-poly1305") == 0);
	CHECK(fmt_cipher_name(2) == NULL);
	return check_done();
}

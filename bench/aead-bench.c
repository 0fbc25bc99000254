/* aead-bench.c: the chunk AEAD candidates of docs/FORMAT.md ("Cipher choice"), one core, MB/s.
 *
 * Not built by meson (a tool to run by hand, like bench/run); the "keyfs v2" rows call keyfs's own
 * chunk code (content/format.c), so build it with that:
 *   cc -O2 -Iinclude -o /tmp/aead-bench bench/aead-bench.c content/format.c \
 *      $(pkg-config --cflags --libs libsodium libcrypto) -lpthread
 *   /tmp/aead-bench [runs]         # default 7 runs; the median is printed
 *
 * Figures are per core: thread CPU time, and the candidates take turns within each run (64 MiB each
 * a turn), so a noisy neighbour weighs on all of them alike.
 *
 * Every figure seals or opens one chunk per call the way keyfs does: a fresh key setup per chunk
 * (the XChaCha20 subkey differs for every nonce), 24 bytes of associated data (file id || index).
 * OpenSSL rows reuse one EVP_CIPHER_CTX and re-init key and IV per chunk, unless the row says
 * otherwise ("new ctx": EVP_CIPHER_CTX_new/free per chunk; "+reset": EVP_CIPHER_CTX_reset after each
 * chunk, which wipes and frees the provider state holding the key).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>
#include <sodium.h>

#include "keyfs/format.h"

#define AD_LEN 24
#define MAX_LEN 65536

static uint8_t key[32], ad[AD_LEN], nonce[24], pt[MAX_LEN], ct[MAX_LEN + 16], out[MAX_LEN];
static EVP_CIPHER *chacha, *gcm;
static EVP_CIPHER_CTX *ctx;
static crypto_aead_aes256gcm_state sodium_gcm_state;
static struct fmt_keys keys_x, keys_xaes;       /* keyfs v2 rows: one file of each cipher */
static uint8_t entries[MAX_LEN / 4096][FMT_V2_ENTRY_SIZE];

static double now(void)
{
	struct timespec ts;

	/* CPU time of this thread: the machine is shared, and time spent descheduled is not the cipher's */
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "aead-bench: %s failed\n", what);
	exit(1);
}

/* XChaCha20-Poly1305-IETF from HChaCha20 and OpenSSL's ChaCha20-Poly1305 (RFC 8439). */
enum ctx_mode { CTX_REUSE, CTX_RESET, CTX_NEW };

static void ossl_xchacha(int enc, size_t len, enum ctx_mode mode)
{
	uint8_t sub[32], iv[12] = { 0 };
	EVP_CIPHER_CTX *c = ctx;
	int n;

	crypto_core_hchacha20(sub, nonce, key, NULL);
	memcpy(iv + 4, nonce + 16, 8);
	if (mode == CTX_NEW && !(c = EVP_CIPHER_CTX_new()))
		die("EVP_CIPHER_CTX_new");
	if (!EVP_CipherInit_ex2(c, mode == CTX_REUSE ? NULL : chacha, sub, iv, enc, NULL))
		die("init");
	sodium_memzero(sub, sizeof(sub));
	if (!EVP_CipherUpdate(c, NULL, &n, ad, AD_LEN))
		die("ad");
	if (enc) {
		if (!EVP_CipherUpdate(c, ct, &n, pt, (int)len) || !EVP_CipherFinal_ex(c, ct + n, &n) ||
		    !EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, 16, ct + len))
			die("seal");
	} else {
		if (!EVP_CipherUpdate(c, out, &n, ct, (int)len) ||
		    !EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, 16, ct + len) || !EVP_CipherFinal_ex(c, out + n, &n))
			die("open");
	}
	if (mode == CTX_RESET)
		EVP_CIPHER_CTX_reset(c);
	else if (mode == CTX_NEW)
		EVP_CIPHER_CTX_free(c);
}

static void ossl_gcm(int enc, size_t len)
{
	int n;

	if (!EVP_CipherInit_ex2(ctx, NULL, key, nonce, enc, NULL) || !EVP_CipherUpdate(ctx, NULL, &n, ad, AD_LEN))
		die("gcm init");
	if (enc) {
		if (!EVP_CipherUpdate(ctx, ct, &n, pt, (int)len) || !EVP_CipherFinal_ex(ctx, ct + n, &n) ||
		    !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, 16, ct + len))
			die("gcm seal");
	} else {
		if (!EVP_CipherUpdate(ctx, out, &n, ct, (int)len) ||
		    !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, 16, ct + len) ||
		    !EVP_CipherFinal_ex(ctx, out + n, &n))
			die("gcm open");
	}
}

enum which {
	SODIUM_X_SEAL, SODIUM_X_OPEN, HCHACHA, EVP_INIT,
	OSSL_X_SEAL, OSSL_X_OPEN, OSSL_X_SEAL_RESET, OSSL_X_OPEN_RESET, OSSL_X_SEAL_NEW, OSSL_X_OPEN_NEW,
	OSSL_GCM_SEAL, OSSL_GCM_OPEN, KEYFS_X_SEAL, KEYFS_X_OPEN, KEYFS_XAES_SEAL, KEYFS_XAES_OPEN, SODIUM_GCM_SEAL, SODIUM_GCM_OPEN, SODIUM_GCM_SEAL_PRE, SODIUM_GCM_OPEN_PRE,
	N_WHICH
};

static const char *names[N_WHICH] = {
	"libsodium xchacha20-poly1305 seal", "libsodium xchacha20-poly1305 open",
	"libsodium hchacha20 alone (ns/chunk)", "EVP chacha init key+iv alone (ns/chunk)",
	"hchacha20+openssl chacha20-poly1305 seal", "hchacha20+openssl chacha20-poly1305 open",
	"  same, seal +reset", "  same, open +reset", "  same, seal new ctx", "  same, open new ctx",
	"openssl aes-256-gcm seal", "openssl aes-256-gcm open",
	"keyfs v2 chunks, xchacha20-poly1305 seal", "keyfs v2 chunks, xchacha20-poly1305 open",
	"keyfs v2 chunks, xaes-256-gcm seal", "keyfs v2 chunks, xaes-256-gcm open",
	"libsodium aes-256-gcm seal", "libsodium aes-256-gcm open",
	"libsodium aes-256-gcm seal, key expanded once", "libsodium aes-256-gcm open, key expanded once",
};

/* len bytes as keyfs writes and reads them: 4 KiB v2 chunks, one context held per request. */
static void keyfs_v2(int enc, const struct fmt_keys *k, size_t len)
{
	fmt_chunk_hold();
	for (size_t off = 0; off < len; off += 4096) {
		if (enc)
			fmt_chunk_seal_v2(k, ad, off / 4096, nonce, pt + off, 4096, ct + off, entries[off / 4096]);
		else if (fmt_chunk_open_v2(k, ad, off / 4096, entries[off / 4096], ct + off, 4096, out + off) != 4096)
			die("keyfs open");
	}
	fmt_chunk_release();
}

static void prepare(enum which w, size_t len)
{
	unsigned long long clen;

	/* open rows need a valid ciphertext of their own kind */
	switch (w) {
	case SODIUM_X_OPEN:
		crypto_aead_xchacha20poly1305_ietf_encrypt(ct, &clen, pt, len, ad, AD_LEN, NULL, nonce, key);
		break;
	case OSSL_X_OPEN: case OSSL_X_OPEN_RESET: case OSSL_X_OPEN_NEW:
		EVP_CipherInit_ex2(ctx, chacha, key, nonce, 1, NULL);
		ossl_xchacha(1, len, CTX_REUSE);
		break;
	case OSSL_GCM_OPEN:
		EVP_CipherInit_ex2(ctx, gcm, key, nonce, 1, NULL);
		ossl_gcm(1, len);
		break;
	case SODIUM_GCM_OPEN: case SODIUM_GCM_OPEN_PRE:
		crypto_aead_aes256gcm_encrypt(ct, &clen, pt, len, ad, AD_LEN, NULL, nonce, key);
		break;
	case KEYFS_X_OPEN:
		keyfs_v2(1, &keys_x, len);
		break;
	case KEYFS_XAES_OPEN:
		keyfs_v2(1, &keys_xaes, len);
		break;
	default:
		break;
	}
	if (w >= OSSL_X_SEAL && w <= OSSL_X_OPEN_NEW)
		EVP_CipherInit_ex2(ctx, chacha, key, nonce, 1, NULL);
	else if (w == EVP_INIT)
		EVP_CipherInit_ex2(ctx, chacha, key, nonce, 1, NULL);
	else if (w == OSSL_GCM_SEAL || w == OSSL_GCM_OPEN)
		EVP_CipherInit_ex2(ctx, gcm, key, nonce, 1, NULL);
}

static void once(enum which w, size_t len)
{
	unsigned long long l;
	uint8_t sub[32], iv[12] = { 0 };

	switch (w) {
	case SODIUM_X_SEAL:
		crypto_aead_xchacha20poly1305_ietf_encrypt(ct, &l, pt, len, ad, AD_LEN, NULL, nonce, key);
		break;
	case SODIUM_X_OPEN:
		if (crypto_aead_xchacha20poly1305_ietf_decrypt(out, &l, NULL, ct, len + 16, ad, AD_LEN, nonce, key))
			die("sodium open");
		break;
	case HCHACHA:
		crypto_core_hchacha20(sub, nonce, key, NULL);
		nonce[0] ^= sub[0];     /* keep the call live */
		break;
	case EVP_INIT:
		memcpy(iv + 4, nonce + 16, 8);
		if (!EVP_CipherInit_ex2(ctx, NULL, key, iv, 1, NULL))
			die("init");
		break;
	case OSSL_X_SEAL: ossl_xchacha(1, len, CTX_REUSE); break;
	case OSSL_X_OPEN: ossl_xchacha(0, len, CTX_REUSE); break;
	case OSSL_X_SEAL_RESET: ossl_xchacha(1, len, CTX_RESET); break;
	case OSSL_X_OPEN_RESET: ossl_xchacha(0, len, CTX_RESET); break;
	case OSSL_X_SEAL_NEW: ossl_xchacha(1, len, CTX_NEW); break;
	case OSSL_X_OPEN_NEW: ossl_xchacha(0, len, CTX_NEW); break;
	case OSSL_GCM_SEAL: ossl_gcm(1, len); break;
	case OSSL_GCM_OPEN: ossl_gcm(0, len); break;
	case KEYFS_X_SEAL: keyfs_v2(1, &keys_x, len); break;
	case KEYFS_X_OPEN: keyfs_v2(0, &keys_x, len); break;
	case KEYFS_XAES_SEAL: keyfs_v2(1, &keys_xaes, len); break;
	case KEYFS_XAES_OPEN: keyfs_v2(0, &keys_xaes, len); break;
	case SODIUM_GCM_SEAL:
		crypto_aead_aes256gcm_encrypt(ct, &l, pt, len, ad, AD_LEN, NULL, nonce, key);
		break;
	case SODIUM_GCM_OPEN:
		if (crypto_aead_aes256gcm_decrypt(out, &l, NULL, ct, len + 16, ad, AD_LEN, nonce, key))
			die("sodium gcm open");
		break;
	case SODIUM_GCM_SEAL_PRE:
		crypto_aead_aes256gcm_encrypt_afternm(ct, &l, pt, len, ad, AD_LEN, NULL, nonce, &sodium_gcm_state);
		break;
	case SODIUM_GCM_OPEN_PRE:
		if (crypto_aead_aes256gcm_decrypt_afternm(out, &l, NULL, ct, len + 16, ad, AD_LEN, nonce,
							  &sodium_gcm_state))
			die("sodium gcm open");
		break;
	default:
		break;
	}
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	int runs = argc > 1 ? atoi(argv[1]) : 7;
	size_t lens[] = { 4096, 65536 };
	static double r[N_WHICH][2][64];
	int gcm_ok;

	if (sodium_init() < 0 || runs < 1 || runs > 64)
		die("sodium_init/args");
	gcm_ok = crypto_aead_aes256gcm_is_available();
	randombytes_buf(key, sizeof(key));
	randombytes_buf(ad, sizeof(ad));
	randombytes_buf(nonce, sizeof(nonce));
	randombytes_buf(pt, sizeof(pt));
	if (fmt_keys_derive(key, FMT_CIPHER_XCHACHA20_POLY1305, &keys_x) < 0 ||
	    fmt_keys_derive(key, FMT_CIPHER_XAES_256_GCM, &keys_xaes) < 0)
		die("fmt_keys_derive");
	chacha = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
	gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
	ctx = EVP_CIPHER_CTX_new();
	if (!chacha || !gcm || !ctx)
		die("EVP_CIPHER_fetch");
	if (gcm_ok)
		crypto_aead_aes256gcm_beforenm(&sodium_gcm_state, key);
	printf("%s; %s; median of %d runs, one core\n", OpenSSL_version(OPENSSL_VERSION), "libsodium "
	       SODIUM_VERSION_STRING, runs);
	printf("%-48s %12s %12s\n", "candidate", "4 KiB MB/s", "64 KiB MB/s");
	for (int k = 0; k < runs; k++) {
		for (int w = 0; w < N_WHICH; w++) {
			if (!gcm_ok && w >= SODIUM_GCM_SEAL)
				continue;
			for (int li = 0; li < 2; li++) {
				size_t len = lens[li];
				long iters = (long)(64 << 20) / (long)len;
				double t0, dt;

				if (w == HCHACHA || w == EVP_INIT) {
					if (li)
						continue;
					iters = 200000;
				}
				prepare(w, len);
				t0 = now();
				for (long i = 0; i < iters; i++)
					once(w, len);
				dt = now() - t0;
				r[w][li][k] = (w == HCHACHA || w == EVP_INIT) ? dt / iters * 1e9 : len * (double)iters / dt / 1e6;
			}
		}
	}
	for (int w = 0; w < N_WHICH; w++) {
		printf("%-48s", names[w]);
		if (!gcm_ok && w >= SODIUM_GCM_SEAL) {
			printf(" %12s\n", "n/a");
			continue;
		}
		for (int li = 0; li < ((w == HCHACHA || w == EVP_INIT) ? 1 : 2); li++) {
			qsort(r[w][li], runs, sizeof(double), cmp);
			printf(" %12.0f", r[w][li][runs / 2]);
		}
		printf("\n");
	}
	EVP_CIPHER_CTX_free(ctx);
	EVP_CIPHER_free(chacha);
	EVP_CIPHER_free(gcm);
	return 0;
}

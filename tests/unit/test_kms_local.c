/* test_kms_local.c: unit test of the local keystore and its kms backend in a temporary dir */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "check.h"
#include "keyfs/keystore.h"
#include "keyfs/kms.h"
#include "keyfs/util.h"

static char tmp[] = "/tmp/test_kms_local.XXXXXX";
static char ks[4096];

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	return remove(path);
}

static unsigned file_mode(const char *path)
{
	struct stat st;

	if (stat(path, &st) < 0)
		return 0;
	return (unsigned)(st.st_mode & 07777);
}

static char *slurp(const char *path)
{
	char *buf = NULL;
	size_t len;

	if (util_read_file(AT_FDCWD, path, 65536, &buf, &len) < 0)
		return NULL;
	return buf;
}

static void key_path(const char *name, char *out, size_t size)
{
	snprintf(out, size, "%s/%s.key", ks, name);
}

static void mat_path(const char *name, unsigned version, char *out, size_t size)
{
	snprintf(out, size, "%s/%s.v%u.material", ks, name, version);
}

/* Up to size bytes of path; -1 when unreadable. */
static ssize_t read_bytes(const char *path, void *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = pread(fd, buf, size, 0);
	close(fd);
	return n;
}

/* Overwrite path in place (same inode), like shred without -u, or put bytes back. */
static int write_in_place(const char *path, const void *buf, size_t len, off_t trunc_to)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	int r = 0;

	if (fd < 0)
		return -1;
	if (pwrite(fd, buf, len, 0) != (ssize_t)len || (trunc_to >= 0 && ftruncate(fd, trunc_to) < 0) ||
	    fsync(fd) < 0)
		r = -1;
	close(fd);
	return r;
}

static bool contains(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m)
{
	for (size_t i = 0; i + m <= n; i++)
		if (memcmp(hay + i, needle, m) == 0)
			return true;
	return false;
}

/* What the volume layer hands keyclient for a volume of a local key (the AAD is the volume's). */
struct tvol {
	char volume[37], kms[16], key[KEYSTORE_NAME_MAX + 1], key_id[KMS_KEY_ID_MAX + 1], keystore[4200];
};
#define TVOL_CONFIG(v) { .kms = (v).kms, .key = (v).key, .key_id = (v).key_id, .keystore = (v).keystore }
#define AAD_COUNT 2

static struct kms *open_vol(struct tvol *vol, const char *name, const char *key_id, int *ret_r, struct kms_err *err)
{
	struct kms_config cfg = TVOL_CONFIG(*vol);
	struct kms *k = NULL;

	memset(vol, 0, sizeof(*vol));
	snprintf(vol->volume, sizeof(vol->volume), "0b5f8a52-2a53-4c1b-9c7e-1d2e3f405162");
	snprintf(vol->kms, sizeof(vol->kms), "local");
	snprintf(vol->key, sizeof(vol->key), "%s", name);
	snprintf(vol->key_id, sizeof(vol->key_id), "%s", key_id ? key_id : "");
	snprintf(vol->keystore, sizeof(vol->keystore), "%s", ks);
	*ret_r = kms_open(&cfg, &k, err);
	return k;
}

struct worker {
	struct kms *k;
	const char *const *aad;
	int bad;
};

static void *hammer(void *arg)
{
	struct worker *w = arg;
	uint8_t dek[KMS_DEK_SIZE], out[KMS_DEK_SIZE];

	for (int i = 0; i < 50; i++) {
		struct kms_wrapped wr;
		bool rw = true;

		randombytes_buf(dek, sizeof(dek));
		if (kms_wrap(w->k, dek, w->aad, AAD_COUNT, &wr, NULL) != 0 ||
		    kms_unwrap(w->k, wr.blob, wr.len, w->aad, AAD_COUNT, out, NULL, &rw, NULL) != 0 ||
		    memcmp(dek, out, sizeof(dek)) != 0 || rw)
			w->bad++;
	}
	return NULL;
}

int main(void)
{
	char fid[33] = "00112233445566778899aabbccddeeff";
	const char *aad[AAD_COUNT], *aad_other[AAD_COUNT], *aad_swapped[AAD_COUNT];
	struct keystore_info info, info2;
	struct kms_wrapped w1, w2;
	struct kms_err err;
	struct tvol vol;
	struct kms *k;
	uint8_t *dek, *out;
	char path[4200], name64[KEYSTORE_NAME_MAX + 2];
	char long_aad[300];
	bool rw;
	int r, st;

	if (sodium_init() < 0 || !mkdtemp(tmp))
		return 99;
	umask(022);
	snprintf(ks, sizeof(ks), "%s/a/b/keystore", tmp);
	dek = sodium_malloc(KMS_DEK_SIZE);
	out = sodium_malloc(KMS_DEK_SIZE);
	randombytes_buf(dek, KMS_DEK_SIZE);

	/* names */
	CHECK_EQ(keystore_name_valid("demo"), 0);
	CHECK_EQ(keystore_name_valid("a.b_c-9"), 0);
	CHECK_EQ(keystore_name_valid(""), -EINVAL);
	CHECK_EQ(keystore_name_valid(".hidden"), -EINVAL);
	CHECK_EQ(keystore_name_valid("a/b"), -EINVAL);
	CHECK_EQ(keystore_name_valid("a b"), -EINVAL);
	memset(name64, 'x', sizeof(name64));
	name64[KEYSTORE_NAME_MAX] = '\0';
	CHECK_EQ(keystore_name_valid(name64), 0);
	name64[KEYSTORE_NAME_MAX] = 'x';
	name64[KEYSTORE_NAME_MAX + 1] = '\0';
	CHECK_EQ(keystore_name_valid(name64), -EINVAL);

	/* create: mkdir -p, dir 0700, file 0600 */
	CHECK_EQ(keystore_create(ks, "demo", &info), 0);
	CHECK_EQ(info.state, KMS_STATE_ACTIVE);
	CHECK_EQ(info.version, 1);
	CHECK_EQ(strlen(info.id), 36);
	CHECK_EQ(file_mode(ks), 0700);
	key_path("demo", path, sizeof(path));
	CHECK(strcmp(info.path, path) == 0);
	CHECK_EQ(file_mode(path), 0600);
	CHECK_EQ(info.format, 2);
	{
		char mp[4200], *text = slurp(path);
		uint8_t m[200];

		/* the state file holds no material; the material file is 112 bytes, 0600 */
		CHECK(text && strstr(text, "format=2\n") && strstr(text, "versions=1\n") && !strstr(text, "version="));
		free(text);
		mat_path("demo", 1, mp, sizeof(mp));
		CHECK_EQ(file_mode(mp), 0600);
		CHECK_EQ(read_bytes(mp, m, sizeof(m)), 112);
		CHECK(memcmp(m, "KEYFSKM1", 8) == 0 && m[8] == 1 && memcmp(m + 12, info.id, 36) == 0);
	}
	CHECK_EQ(keystore_create(ks, "demo", NULL), -EEXIST);
	CHECK_EQ(keystore_show(ks, "demo", &info2), 0);
	CHECK(strcmp(info.id, info2.id) == 0);
	CHECK_EQ(keystore_show(ks, "nokey", &info2), -ENOENT);
	CHECK_EQ(keystore_create(ks, "bad/name", NULL), -EINVAL);

	/* open */
	k = open_vol(&vol, "demo", NULL, &r, &err);
	CHECK_EQ(r, 0);
	if (!k) {
		fprintf(stderr, "kms_open: %s\n", err.msg);
		return 1;
	}
	CHECK(strcmp(kms_key_id(k), info.id) == 0);
	CHECK_EQ(kms_key_state(k, &st, &err), 0);
	CHECK_EQ(st, KMS_STATE_ACTIVE);

	/* roundtrip */
	aad[0] = vol.volume;
	aad[1] = fid;
	CHECK_EQ(kms_wrap(k, dek, aad, AAD_COUNT, &w1, &err), 0);
	CHECK_EQ(w1.len, 77);
	CHECK_EQ(w1.blob[0], 1);
	CHECK_EQ(w1.blob[1], 1);
	CHECK(strcmp(w1.key_version, "1") == 0);
	rw = true;
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, AAD_COUNT, out, NULL, &rw, &err), 0);
	CHECK(sodium_memcmp(dek, out, KMS_DEK_SIZE) == 0);
	CHECK(!rw);
	CHECK_EQ(kms_wrap(k, dek, aad, AAD_COUNT, &w2, &err), 0);
	CHECK(memcmp(w1.blob, w2.blob, w1.len) != 0);           /* fresh nonce per wrap */

	/* wrong aad, swapped aad, tampered or truncated blob */
	aad_other[0] = "0b5f8a52-2a53-4c1b-9c7e-1d2e3f405163";
	aad_other[1] = fid;
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad_other, AAD_COUNT, out, NULL, &rw, &err), -EBADMSG);
	aad_swapped[0] = fid;
	aad_swapped[1] = vol.volume;
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad_swapped, AAD_COUNT, out, NULL, &rw, &err), -EBADMSG);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, 1, out, NULL, &rw, &err), -EBADMSG);
	w2 = w1;
	w2.blob[40] ^= 1;
	CHECK_EQ(kms_unwrap(k, w2.blob, w2.len, aad, AAD_COUNT, out, NULL, &rw, &err), -EBADMSG);
	w2 = w1;
	w2.blob[1] = 7;
	CHECK_EQ(kms_unwrap(k, w2.blob, w2.len, aad, AAD_COUNT, out, NULL, &rw, &err), -EBADMSG);
	CHECK_EQ(kms_unwrap(k, w1.blob, 76, aad, AAD_COUNT, out, NULL, &rw, &err), -EBADMSG);
	memset(long_aad, 'a', sizeof(long_aad));
	long_aad[256] = '\0';
	aad_other[0] = long_aad;
	CHECK_EQ(kms_wrap(k, dek, aad_other, AAD_COUNT, &w2, &err), -EINVAL);
	long_aad[255] = '\0';
	CHECK_EQ(kms_wrap(k, dek, aad_other, AAD_COUNT, &w2, &err), 0);

	/* many threads at once */
	{
		pthread_t th[4];
		struct worker wk[4];

		for (int i = 0; i < 4; i++) {
			wk[i] = (struct worker){ .k = k, .aad = aad };
			pthread_create(&th[i], NULL, hammer, &wk[i]);
		}
		for (int i = 0; i < 4; i++) {
			pthread_join(th[i], NULL);
			CHECK_EQ(wk[i].bad, 0);
		}
	}

	/* suspended: nothing unwraps or wraps */
	CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_SUSPENDED), 0);
	CHECK_EQ(file_mode(path), 0600);
	CHECK_EQ(kms_key_state(k, &st, &err), 0);
	CHECK_EQ(st, KMS_STATE_SUSPENDED);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, AAD_COUNT, out, NULL, &rw, &err), -ENOKEY);
	CHECK_EQ(kms_wrap(k, dek, aad, AAD_COUNT, &w2, &err), -ENOKEY);

	/* deactivated: unwrap yes, wrap no */
	CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_DEACTIVATED), 0);
	CHECK_EQ(kms_wrap(k, dek, aad, AAD_COUNT, &w2, &err), -EKEYEXPIRED);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, AAD_COUNT, out, NULL, &rw, &err), 0);

	CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_ACTIVE), 0);
	CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_ACTIVE), 0);
	CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_DESTROYED), -EINVAL);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, AAD_COUNT, out, NULL, &rw, &err), 0);

	/* rotation: a second material file; wrap uses the newest, old blobs still unwrap */
	{
		char m1[4200], m2[4200], *text;
		uint8_t b1[112], b1after[112];
		struct stat s1, s1after;

		mat_path("demo", 1, m1, sizeof(m1));
		mat_path("demo", 2, m2, sizeof(m2));
		CHECK_EQ(stat(m1, &s1), 0);
		CHECK_EQ(read_bytes(m1, b1, sizeof(b1)), 112);
		CHECK_EQ(keystore_rotate(ks, "demo", &info2), 0);
		CHECK_EQ(info2.version, 2);
		CHECK_EQ(file_mode(m2), 0600);
		CHECK_EQ(keystore_show(ks, "demo", &info2), 0);
		CHECK_EQ(info2.version, 2);
		CHECK_EQ(kms_wrap(k, dek, aad, AAD_COUNT, &w2, &err), 0);
		CHECK(strcmp(w2.key_version, "2") == 0);
		CHECK_EQ(w2.blob[1], 2);
		CHECK_EQ(kms_unwrap(k, w2.blob, w2.len, aad, AAD_COUNT, out, NULL, &rw, &err), 0);
		CHECK(sodium_memcmp(dek, out, KMS_DEK_SIZE) == 0);
		CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, AAD_COUNT, out, NULL, &rw, &err), 0);
		CHECK(sodium_memcmp(dek, out, KMS_DEK_SIZE) == 0);
		/* suspend and enable rewrite the state file only: the material files are never copied */
		CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_SUSPENDED), 0);
		CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_ACTIVE), 0);
		CHECK_EQ(stat(m1, &s1after), 0);
		CHECK(s1.st_ino == s1after.st_ino && s1.st_mtim.tv_nsec == s1after.st_mtim.tv_nsec &&
		      s1.st_mtim.tv_sec == s1after.st_mtim.tv_sec);
		CHECK_EQ(read_bytes(m1, b1after, sizeof(b1after)), 112);
		CHECK(memcmp(b1, b1after, sizeof(b1)) == 0);
		text = slurp(path);
		CHECK(text && strstr(text, "versions=2\n") && !strstr(text, "version="));
		free(text);
		CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, AAD_COUNT, out, NULL, &rw, &err), 0);
		CHECK_EQ(kms_unwrap(k, w2.blob, w2.len, aad, AAD_COUNT, out, NULL, &rw, &err), 0);
	}

	/*
	 * A material file zeroed, changed, cut or removed (shred without -u, a destroy cut short):
	 * the key is destroyed at once, for every version, not a keystore outage; and back when the
	 * file is put back.
	 */
	{
		static const uint8_t zeros[112];
		char m1[4200], m2[4200];
		uint8_t saved[112], bad[112];
		static const char *const why[] = { "all zeros", "not an intact", "wrong length", "missing" };

		mat_path("demo", 1, m1, sizeof(m1));
		mat_path("demo", 2, m2, sizeof(m2));
		CHECK_EQ(read_bytes(m2, saved, sizeof(saved)), 112);
		for (int i = 0; i < 4; i++) {
			memcpy(bad, saved, sizeof(bad));
			bad[60] ^= 1;
			if (i == 0)
				CHECK_EQ(write_in_place(m2, zeros, sizeof(zeros), -1), 0);
			else if (i == 1)
				CHECK_EQ(write_in_place(m2, bad, sizeof(bad), -1), 0);
			else if (i == 2)
				CHECK_EQ(write_in_place(m2, saved, 100, 100), 0);
			else
				CHECK_EQ(unlink(m2), 0);
			st = -1;
			CHECK_EQ(kms_key_state(k, &st, &err), 0);
			CHECK_EQ(st, KMS_STATE_DESTROYED);
			CHECK(strstr(err.msg, m2) && strstr(err.msg, why[i]) && strstr(err.msg, "counts as destroyed"));
			CHECK_EQ(kms_wrap(k, dek, aad, AAD_COUNT, &w2, &err), -EKEYREVOKED);
			CHECK(strstr(err.msg, why[i]) != NULL);
			CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, AAD_COUNT, out, NULL, &rw, &err), -EKEYREVOKED);
			CHECK_EQ(keystore_show(ks, "demo", &info2), 0);
			CHECK_EQ(info2.state, KMS_STATE_DESTROYED);
			CHECK(strstr(info2.note, why[i]) != NULL);
			CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_SUSPENDED), -EKEYREVOKED);
			CHECK_EQ(keystore_rotate(ks, "demo", NULL), -EKEYREVOKED);
			if (i < 3)
				CHECK_EQ(write_in_place(m2, saved, sizeof(saved), -1), 0);
			else
				CHECK_EQ(util_write_file_atomic(AT_FDCWD, m2, saved, sizeof(saved), 0600), 0);
			CHECK_EQ(kms_key_state(k, &st, &err), 0);
			CHECK_EQ(st, KMS_STATE_ACTIVE);
			CHECK_EQ(kms_wrap(k, dek, aad, AAD_COUNT, &w2, &err), 0);
		}
		/* version 1's file copied over version 2's: another version's material is damage */
		{
			uint8_t b1[112];

			CHECK_EQ(read_bytes(m1, b1, sizeof(b1)), 112);
			CHECK_EQ(write_in_place(m2, b1, sizeof(b1), -1), 0);
			CHECK_EQ(kms_key_state(k, &st, &err), 0);
			CHECK_EQ(st, KMS_STATE_DESTROYED);
			CHECK(strstr(err.msg, "another key or version") != NULL);
			CHECK_EQ(write_in_place(m2, saved, sizeof(saved), -1), 0);
		}
		/* the state file zeroed in place: destroyed as well, not an outage (no grace) */
		{
			char *text = slurp(path);
			size_t n = text ? strlen(text) : 0;
			char *z = calloc(1, n + 1);

			CHECK(text && z);
			CHECK_EQ(write_in_place(path, z, n, -1), 0);
			CHECK_EQ(kms_key_state(k, &st, &err), 0);
			CHECK_EQ(st, KMS_STATE_DESTROYED);
			CHECK(strstr(err.msg, "is damaged") && strstr(err.msg, "counts as destroyed"));
			CHECK_EQ(kms_wrap(k, dek, aad, AAD_COUNT, &w2, &err), -EKEYREVOKED);
			CHECK_EQ(keystore_show(ks, "demo", &info2), -EUCLEAN);
			CHECK_EQ(write_in_place(path, text, n, -1), 0);
			CHECK_EQ(kms_key_state(k, &st, &err), 0);
			CHECK_EQ(st, KMS_STATE_ACTIVE);
			free(text);
			free(z);
		}
		/* an I/O problem is no destroy: an unreadable material file is an error (outage) */
		chmod(m2, 0640);
		CHECK_EQ(kms_key_state(k, &st, &err), -EACCES);
		chmod(m2, 0600);
	}

	/* a format-1 key file (an earlier keyfs, material inline): read, then migrated by its first
	 * change, and the old file overwritten in place before it goes */
	{
		static const char id1[] = "3f0e4c5a-7b1d-4e2f-8a9b-0c1d2e3f4a5b";
		uint8_t m[2][32], got[112], oldbuf[1024];
		char b64[2][64], text[1024], opath[4200], mp[4200], stale_link[4200];
		struct tvol vol1;
		struct kms *ko;
		int ofd;
		ssize_t n;

		for (int i = 0; i < 2; i++) {
			randombytes_buf(m[i], 32);
			sodium_bin2base64(b64[i], sizeof(b64[i]), m[i], 32, sodium_base64_VARIANT_ORIGINAL);
		}
		snprintf(text, sizeof(text), "# keyfs local key; do not edit or copy\nformat=1\nname=old1\nid=%s\nstate=1\n"
			 "created=2024-01-01T00:00:00Z\nupdated=2024-01-01T00:00:00Z\nversion=1 %s\nversion=2 %s\n",
			 id1, b64[0], b64[1]);
		key_path("old1", opath, sizeof(opath));
		CHECK_EQ(util_write_file_atomic(AT_FDCWD, opath, text, strlen(text), 0600), 0);
		CHECK_EQ(keystore_show(ks, "old1", &info2), 0);
		CHECK_EQ(info2.format, 1);
		CHECK_EQ(info2.version, 2);
		CHECK_EQ(info2.state, KMS_STATE_ACTIVE);
		ko = open_vol(&vol1, "old1", NULL, &r, &err);
		CHECK_EQ(r, 0);
		CHECK(ko != NULL);
		CHECK_EQ(kms_wrap(ko, dek, aad, AAD_COUNT, &w2, &err), 0);
		CHECK_EQ(w2.blob[1], 2);
		ofd = open(opath, O_RDONLY | O_CLOEXEC);
		CHECK(ofd >= 0);
		CHECK_EQ(keystore_set_state(ks, "old1", KMS_STATE_SUSPENDED), 0);
		CHECK_EQ(keystore_show(ks, "old1", &info2), 0);
		CHECK_EQ(info2.format, 2);
		CHECK_EQ(info2.state, KMS_STATE_SUSPENDED);
		CHECK_EQ(info2.version, 2);
		/* the old inode, read through a descriptor held across the change: overwritten */
		n = pread(ofd, oldbuf, sizeof(oldbuf), 0);
		CHECK_EQ(n, (ssize_t)strlen(text));
		CHECK(!contains(oldbuf, (size_t)n, (const uint8_t *)b64[0], 43));
		CHECK(!contains(oldbuf, (size_t)n, (const uint8_t *)b64[1], 43));
		CHECK(!contains(oldbuf, (size_t)n, (const uint8_t *)"version=", 8));
		close(ofd);
		for (unsigned v = 1; v <= 2; v++) {
			mat_path("old1", v, mp, sizeof(mp));
			CHECK_EQ(read_bytes(mp, got, sizeof(got)), 112);
			CHECK(memcmp(got + 48, m[v - 1], 32) == 0);
			CHECK_EQ(file_mode(mp), 0600);
		}
		{
			char *st_text = slurp(opath);

			CHECK(st_text && !strstr(st_text, b64[0]) && !strstr(st_text, b64[1]) && strstr(st_text, "versions=2\n"));
			free(st_text);
		}
		snprintf(stale_link, sizeof(stale_link), "%s/.old1.key.old", ks);
		CHECK(access(stale_link, F_OK) < 0 && errno == ENOENT);
		CHECK_EQ(keystore_set_state(ks, "old1", KMS_STATE_ACTIVE), 0);
		CHECK_EQ(kms_unwrap(ko, w2.blob, w2.len, aad, AAD_COUNT, out, NULL, &rw, &err), 0);
		CHECK(sodium_memcmp(dek, out, KMS_DEK_SIZE) == 0);
		kms_free(ko);

		/* a migration cut short after the new state file: the old file's second name is shredded
		 * and removed by the next change; before it, the second name of the live file is only unlinked */
		{
			uint8_t secret[64];
			struct stat sst;

			memset(secret, 'S', sizeof(secret));
			CHECK_EQ(util_write_file_atomic(AT_FDCWD, stale_link, secret, sizeof(secret), 0600), 0);
			ofd = open(stale_link, O_RDONLY | O_CLOEXEC);
			CHECK_EQ(keystore_set_state(ks, "old1", KMS_STATE_SUSPENDED), 0);
			CHECK(access(stale_link, F_OK) < 0 && errno == ENOENT);
			CHECK_EQ(pread(ofd, oldbuf, sizeof(oldbuf), 0), 64);
			CHECK(!contains(oldbuf, 64, secret, 16));
			close(ofd);
			CHECK_EQ(link(opath, stale_link), 0);
			CHECK_EQ(keystore_set_state(ks, "old1", KMS_STATE_ACTIVE), 0);
			CHECK(access(stale_link, F_OK) < 0 && errno == ENOENT);
			CHECK_EQ(stat(opath, &sst), 0);
			CHECK_EQ(keystore_show(ks, "old1", &info2), 0);
			CHECK_EQ(info2.state, KMS_STATE_ACTIVE);
		}
	}

	/* unsafe keystore and key file modes are refused */
	chmod(ks, 0770);
	CHECK_EQ(keystore_show(ks, "demo", &info2), -EPERM);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, AAD_COUNT, out, NULL, &rw, &err), -EACCES);
	chmod(ks, 0700);
	chmod(path, 0640);
	CHECK_EQ(keystore_show(ks, "demo", &info2), -EPERM);
	chmod(path, 0600);
	CHECK_EQ(keystore_show(ks, "demo", &info2), 0);

	/* a damaged key file */
	{
		char bad[4200];
		const char *text = "format=1\nname=other\nid=0b5f8a52-2a53-4c1b-9c7e-1d2e3f405162\nstate=1\n"
				   "created=x\nupdated=x\nversion=1 AAAA\n";

		key_path("other", bad, sizeof(bad));
		CHECK_EQ(util_write_file_atomic(AT_FDCWD, bad, text, strlen(text), 0600), 0);
		CHECK_EQ(keystore_show(ks, "other", &info2), -EUCLEAN);
		text = "format=3\nanything=new\n";
		CHECK_EQ(util_write_file_atomic(AT_FDCWD, bad, text, strlen(text), 0600), 0);
		CHECK_EQ(keystore_show(ks, "other", &info2), -EPROTONOSUPPORT);
	}

	/* destroy: each material file overwritten in place (same inode, read through descriptors
	 * held across it), then a tombstone, then the files removed; a crashed write's copy is wiped */
	{
		char stale[4200], mp[4200];
		uint8_t before[2][112], after[112];
		int mfd[2];

		snprintf(stale, sizeof(stale), "%s/.demo.key.tmp0badf00d", ks);
		CHECK_EQ(util_write_file_atomic(AT_FDCWD, stale, "version=1 x\n", 12, 0600), 0);
		for (unsigned v = 1; v <= 2; v++) {
			mat_path("demo", v, mp, sizeof(mp));
			mfd[v - 1] = open(mp, O_RDONLY | O_CLOEXEC);
			CHECK(mfd[v - 1] >= 0);
			CHECK_EQ(pread(mfd[v - 1], before[v - 1], 112, 0), 112);
		}
		CHECK_EQ(keystore_destroy(ks, "demo"), 0);
		CHECK(access(stale, F_OK) < 0 && errno == ENOENT);
		for (unsigned v = 1; v <= 2; v++) {
			mat_path("demo", v, mp, sizeof(mp));
			CHECK(access(mp, F_OK) < 0 && errno == ENOENT);
			CHECK_EQ(pread(mfd[v - 1], after, 112, 0), 112);
			CHECK(!contains(after, 112, before[v - 1] + 48, 8));
			close(mfd[v - 1]);
		}
	}
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, AAD_COUNT, out, NULL, &rw, &err), -EKEYREVOKED);
	CHECK_EQ(kms_wrap(k, dek, aad, AAD_COUNT, &w2, &err), -EKEYREVOKED);
	CHECK_EQ(kms_key_state(k, &st, &err), 0);
	CHECK_EQ(st, KMS_STATE_DESTROYED);
	CHECK_EQ(keystore_show(ks, "demo", &info2), 0);
	CHECK_EQ(info2.state, KMS_STATE_DESTROYED);
	CHECK_EQ(info2.version, 0);
	CHECK_EQ(keystore_create(ks, "demo", NULL), -EEXIST);
	CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_ACTIVE), -EKEYREVOKED);
	CHECK_EQ(keystore_destroy(ks, "demo"), -EKEYREVOKED);

	/* destroy finishes a key whose material is already damaged (a destroy cut short) */
	{
		static const uint8_t zeros[112];
		char hp[4200], mp[4200];

		CHECK_EQ(keystore_create(ks, "half", NULL), 0);
		mat_path("half", 1, mp, sizeof(mp));
		CHECK_EQ(write_in_place(mp, zeros, sizeof(zeros), -1), 0);
		CHECK_EQ(keystore_show(ks, "half", &info2), 0);
		CHECK_EQ(info2.state, KMS_STATE_DESTROYED);
		CHECK(info2.note[0] != '\0');
		CHECK_EQ(keystore_destroy(ks, "half"), 0);
		CHECK(access(mp, F_OK) < 0 && errno == ENOENT);
		CHECK_EQ(keystore_show(ks, "half", &info2), 0);
		CHECK_EQ(info2.state, KMS_STATE_DESTROYED);
		CHECK(info2.note[0] == '\0');
		key_path("half", hp, sizeof(hp));
		CHECK_EQ(file_mode(hp), 0600);
	}
	/* destroy of a format-1 key (never migrated): its file is overwritten in place */
	{
		char op[4200], text[512], b64[64];
		uint8_t m[32], buf[512];
		int ofd;
		ssize_t n;

		randombytes_buf(m, sizeof(m));
		sodium_bin2base64(b64, sizeof(b64), m, sizeof(m), sodium_base64_VARIANT_ORIGINAL);
		snprintf(text, sizeof(text), "format=1\nname=old2\nid=4f0e4c5a-7b1d-4e2f-8a9b-0c1d2e3f4a5b\nstate=2\n"
			 "created=2024-01-01T00:00:00Z\nupdated=2024-01-01T00:00:00Z\nversion=1 %s\n", b64);
		key_path("old2", op, sizeof(op));
		CHECK_EQ(util_write_file_atomic(AT_FDCWD, op, text, strlen(text), 0600), 0);
		ofd = open(op, O_RDONLY | O_CLOEXEC);
		CHECK_EQ(keystore_destroy(ks, "old2"), 0);
		n = pread(ofd, buf, sizeof(buf), 0);
		CHECK_EQ(n, (ssize_t)strlen(text));
		CHECK(!contains(buf, (size_t)n, (const uint8_t *)b64, 43));
		close(ofd);
		CHECK_EQ(keystore_show(ks, "old2", &info2), 0);
		CHECK_EQ(info2.state, KMS_STATE_DESTROYED);
	}

	/* the tombstone removed by hand and the name reused: still not this volume's key */
	CHECK_EQ(unlink(path), 0);
	CHECK_EQ(kms_key_state(k, &st, &err), 0);
	CHECK_EQ(st, KMS_STATE_PURGED);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, AAD_COUNT, out, NULL, &rw, &err), -ENOENT);
	CHECK_EQ(keystore_create(ks, "demo", &info2), 0);
	CHECK_EQ(kms_key_state(k, &st, &err), 0);
	CHECK_EQ(st, KMS_STATE_PURGED);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, AAD_COUNT, out, NULL, &rw, &err), -EKEYREVOKED);
	kms_free(k);

	/* open errors name the keystore and the key */
	{
		char want[4300];
		struct kms_config cfg = TVOL_CONFIG(vol);

		k = open_vol(&vol, "nokey", NULL, &r, &err);
		CHECK_EQ(r, -ENOENT);
		CHECK(k == NULL);
		snprintf(want, sizeof(want), "key 'nokey' not found in keystore '%s'", ks);
		CHECK(strncmp(err.msg, want, strlen(want)) == 0);

		snprintf(vol.keystore, sizeof(vol.keystore), "%s/missing", tmp);
		CHECK_EQ(kms_open(&cfg, &k, &err), -ENOENT);
		CHECK(strstr(err.msg, "does not exist") != NULL);

		snprintf(vol.kms, sizeof(vol.kms), "keyprotect");
		CHECK_EQ(kms_open(&cfg, &k, &err), -EINVAL);
		CHECK(strcmp(err.msg, "key protect: no instance: give the instance GUID, or the key as a CRN") == 0);
	}

	CHECK(strcmp(kms_state_name(KMS_STATE_SUSPENDED), "suspended") == 0);
	CHECK(strcmp(kms_state_name(KMS_STATE_PURGED), "purged") == 0);

	sodium_free(dek);
	sodium_free(out);
	nftw(tmp, rm_one, 16, FTW_DEPTH | FTW_PHYS);
	return check_done();
}

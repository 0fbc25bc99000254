/* test_kms_local.c: unit test of the local keystore and its kms backend in a temporary dir */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sodium.h>

#include "keyfs/keystore.h"
#include "keyfs/kms.h"
#include "keyfs/util.h"

static int failures;

#define CHECK(cond) do { \
	if (!(cond)) { \
		fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
		failures++; \
	} \
} while (0)

#define CHECK_EQ(got, want) do { \
	long long g_ = (long long)(got), w_ = (long long)(want); \
	if (g_ != w_) { \
		fprintf(stderr, "%s:%d: %s is %lld, want %lld\n", __FILE__, __LINE__, #got, g_, w_); \
		failures++; \
	} \
} while (0)

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

static struct kms *open_vol(struct voldesc *vol, const char *name, const char *key_id, int *ret_r, struct kms_err *err)
{
	struct kms_config cfg = { .vol = vol };
	struct kms *k = NULL;

	memset(vol, 0, sizeof(*vol));
	vol->format = 1;
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
	uint8_t dek[FMT_DEK_SIZE], out[FMT_DEK_SIZE];

	for (int i = 0; i < 50; i++) {
		struct kms_wrapped wr;
		bool rw = true;

		randombytes_buf(dek, sizeof(dek));
		if (kms_wrap(w->k, dek, w->aad, KMS_AAD_COUNT, &wr, NULL) != 0 ||
		    kms_unwrap(w->k, wr.blob, wr.len, w->aad, KMS_AAD_COUNT, out, NULL, &rw, NULL) != 0 ||
		    memcmp(dek, out, sizeof(dek)) != 0 || rw)
			w->bad++;
	}
	return NULL;
}

int main(void)
{
	char fid[2 * FMT_FILE_ID_SIZE + 1] = "00112233445566778899aabbccddeeff";
	const char *aad[KMS_AAD_COUNT], *aad_other[KMS_AAD_COUNT], *aad_swapped[KMS_AAD_COUNT];
	struct keystore_info info, info2;
	struct kms_wrapped w1, w2;
	struct kms_err err;
	struct voldesc vol;
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
	dek = sodium_malloc(FMT_DEK_SIZE);
	out = sodium_malloc(FMT_DEK_SIZE);
	randombytes_buf(dek, FMT_DEK_SIZE);

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
	kms_file_aad(vol.volume, fid, aad);
	CHECK(aad[0] == vol.volume && aad[1] == fid);
	CHECK_EQ(kms_wrap(k, dek, aad, KMS_AAD_COUNT, &w1, &err), 0);
	CHECK_EQ(w1.len, 77);
	CHECK_EQ(w1.blob[0], 1);
	CHECK_EQ(w1.blob[1], 1);
	CHECK(strcmp(w1.key_version, "1") == 0);
	rw = true;
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), 0);
	CHECK(sodium_memcmp(dek, out, FMT_DEK_SIZE) == 0);
	CHECK(!rw);
	CHECK_EQ(kms_wrap(k, dek, aad, KMS_AAD_COUNT, &w2, &err), 0);
	CHECK(memcmp(w1.blob, w2.blob, w1.len) != 0);           /* fresh nonce per wrap */

	/* wrong aad, swapped aad, tampered or truncated blob */
	aad_other[0] = "0b5f8a52-2a53-4c1b-9c7e-1d2e3f405163";
	aad_other[1] = fid;
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad_other, KMS_AAD_COUNT, out, NULL, &rw, &err), -EBADMSG);
	aad_swapped[0] = fid;
	aad_swapped[1] = vol.volume;
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad_swapped, KMS_AAD_COUNT, out, NULL, &rw, &err), -EBADMSG);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, 1, out, NULL, &rw, &err), -EBADMSG);
	w2 = w1;
	w2.blob[40] ^= 1;
	CHECK_EQ(kms_unwrap(k, w2.blob, w2.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), -EBADMSG);
	w2 = w1;
	w2.blob[1] = 7;
	CHECK_EQ(kms_unwrap(k, w2.blob, w2.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), -EBADMSG);
	CHECK_EQ(kms_unwrap(k, w1.blob, 76, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), -EBADMSG);
	memset(long_aad, 'a', sizeof(long_aad));
	long_aad[256] = '\0';
	aad_other[0] = long_aad;
	CHECK_EQ(kms_wrap(k, dek, aad_other, KMS_AAD_COUNT, &w2, &err), -EINVAL);
	long_aad[255] = '\0';
	CHECK_EQ(kms_wrap(k, dek, aad_other, KMS_AAD_COUNT, &w2, &err), 0);

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
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), -ENOKEY);
	CHECK_EQ(kms_wrap(k, dek, aad, KMS_AAD_COUNT, &w2, &err), -ENOKEY);

	/* deactivated: unwrap yes, wrap no */
	CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_DEACTIVATED), 0);
	CHECK_EQ(kms_wrap(k, dek, aad, KMS_AAD_COUNT, &w2, &err), -EKEYEXPIRED);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), 0);

	CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_ACTIVE), 0);
	CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_ACTIVE), 0);
	CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_DESTROYED), -EINVAL);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), 0);

	/* rotation: a second version line; wrap uses the newest, old blobs still unwrap */
	{
		uint8_t m[32];
		char b64[64], line[128];
		int fd;

		randombytes_buf(m, sizeof(m));
		sodium_bin2base64(b64, sizeof(b64), m, sizeof(m), sodium_base64_VARIANT_ORIGINAL);
		snprintf(line, sizeof(line), "version=2 %s\n", b64);
		fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
		CHECK(fd >= 0 && write(fd, line, strlen(line)) == (ssize_t)strlen(line));
		close(fd);
		CHECK_EQ(keystore_show(ks, "demo", &info2), 0);
		CHECK_EQ(info2.version, 2);
		CHECK_EQ(kms_wrap(k, dek, aad, KMS_AAD_COUNT, &w2, &err), 0);
		CHECK(strcmp(w2.key_version, "2") == 0);
		CHECK_EQ(w2.blob[1], 2);
		CHECK_EQ(kms_unwrap(k, w2.blob, w2.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), 0);
		CHECK(sodium_memcmp(dek, out, FMT_DEK_SIZE) == 0);
		CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), 0);
		CHECK(sodium_memcmp(dek, out, FMT_DEK_SIZE) == 0);
		/* a rewrite by set_state keeps both versions */
		CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_SUSPENDED), 0);
		CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_ACTIVE), 0);
		CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), 0);
		CHECK_EQ(kms_unwrap(k, w2.blob, w2.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), 0);
	}

	/* unsafe keystore and key file modes are refused */
	chmod(ks, 0770);
	CHECK_EQ(keystore_show(ks, "demo", &info2), -EPERM);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), -EACCES);
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
		text = "format=2\nanything=new\n";
		CHECK_EQ(util_write_file_atomic(AT_FDCWD, bad, text, strlen(text), 0600), 0);
		CHECK_EQ(keystore_show(ks, "other", &info2), -EPROTONOSUPPORT);
	}

	/* destroy: tombstone without material, the name stays taken, a crashed write's copy is wiped */
	{
		char stale[4200];

		snprintf(stale, sizeof(stale), "%s/.demo.key.tmp0badf00d", ks);
		CHECK_EQ(util_write_file_atomic(AT_FDCWD, stale, "version=1 x\n", 12, 0600), 0);
		CHECK_EQ(keystore_destroy(ks, "demo"), 0);
		CHECK(access(stale, F_OK) < 0 && errno == ENOENT);
	}
	CHECK_EQ(file_mode(path), 0600);
	{
		char *text = slurp(path);

		CHECK(text != NULL);
		if (text) {
			CHECK(strstr(text, "version=") == NULL);
			CHECK(strstr(text, "state=5\n") != NULL);
			CHECK(strstr(text, "destroyed=") != NULL);
			CHECK(strstr(text, info.id) != NULL);
			free(text);
		}
	}
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), -EKEYREVOKED);
	CHECK_EQ(kms_wrap(k, dek, aad, KMS_AAD_COUNT, &w2, &err), -EKEYREVOKED);
	CHECK_EQ(kms_key_state(k, &st, &err), 0);
	CHECK_EQ(st, KMS_STATE_DESTROYED);
	CHECK_EQ(keystore_show(ks, "demo", &info2), 0);
	CHECK_EQ(info2.state, KMS_STATE_DESTROYED);
	CHECK_EQ(info2.version, 0);
	CHECK_EQ(keystore_create(ks, "demo", NULL), -EEXIST);
	CHECK_EQ(keystore_set_state(ks, "demo", KMS_STATE_ACTIVE), -EKEYREVOKED);
	CHECK_EQ(keystore_destroy(ks, "demo"), -EKEYREVOKED);

	/* the tombstone removed by hand and the name reused: still not this volume's key */
	CHECK_EQ(unlink(path), 0);
	CHECK_EQ(kms_key_state(k, &st, &err), 0);
	CHECK_EQ(st, KMS_STATE_PURGED);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), -ENOENT);
	CHECK_EQ(keystore_create(ks, "demo", &info2), 0);
	CHECK_EQ(kms_key_state(k, &st, &err), 0);
	CHECK_EQ(st, KMS_STATE_PURGED);
	CHECK_EQ(kms_unwrap(k, w1.blob, w1.len, aad, KMS_AAD_COUNT, out, NULL, &rw, &err), -EKEYREVOKED);
	kms_free(k);

	/* open errors name the keystore and the key */
	{
		char want[4300];
		struct kms_config cfg = { .vol = &vol };

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
	if (failures) {
		fprintf(stderr, "%d checks failed\n", failures);
		return 1;
	}
	printf("ok\n");
	return 0;
}

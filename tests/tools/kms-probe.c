/* kms-probe.c: test tool driving the kms API from the command line, one JSON line per result (not installed) */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sodium.h>

#include "keyfs/kms.h"
#include "keyfs/log.h"
#include "keyfs/util.h"
#include "keyfs/voldesc.h"

/*
 * kms-probe --voldesc FILE [--apikey-file FILE] [--ca-file FILE] [--keystore DIR] [--clear-instance] CMD ...
 *   wrap AAD...                  {"ok":true,"op":"wrap","blob":...,"key_version":...,"dek_sha256":...}
 *   unwrap BLOB AAD...           {"ok":true,"op":"unwrap","dek_sha256":...,"rewrapped":bool[,"blob","key_version"]}
 *   state                        {"ok":true,"op":"state","state":N,"name":...}
 *   roundtrip N [THREADS [PAUSE_MS]]   N x (wrap + unwrap + compare) over THREADS threads
 * A failure prints {"ok":false,"op":...,"errno":N,"errname":...,"error":...} and exits 1; usage errors exit 2.
 * DEKs are random and never printed: only their SHA-256, so a test can compare them.
 * The blob is the ciphertext string the service returned (never a secret).
 */

static void print_error(const char *op, int r, const struct kms_err *err)
{
	printf("{\"ok\":false,\"op\":");
	util_json_string(stdout, op);
	printf(",\"errno\":%d,\"errname\":", -r);
	util_json_string(stdout, strerrorname_np(-r) ? strerrorname_np(-r) : "?");
	printf(",\"error\":");
	util_json_string(stdout, err->msg[0] ? err->msg : strerror(-r));
	printf("}\n");
	fprintf(stderr, "kms-probe: error: %s\n", err->msg[0] ? err->msg : strerror(-r));
}

static void dek_sha256(const uint8_t *dek, char hex[65])
{
	uint8_t h[crypto_hash_sha256_BYTES];

	crypto_hash_sha256(h, dek, KMS_DEK_SIZE);
	util_hex(h, sizeof(h), hex);
}

static void print_wrapped(const struct kms_wrapped *w)
{
	char blob[KMS_WRAPPED_MAX + 1];

	memcpy(blob, w->blob, w->len);
	blob[w->len] = '\0';
	printf(",\"blob\":");
	util_json_string(stdout, blob);
	printf(",\"key_version\":");
	util_json_string(stdout, w->key_version);
}

static int cmd_wrap(struct kms *k, int argc, char **argv)
{
	struct kms_wrapped w;
	struct kms_err err = { .msg = "" };
	uint8_t *dek = sodium_malloc(KMS_DEK_SIZE);
	char hex[65];
	int r;

	if (!dek)
		return 1;
	randombytes_buf(dek, KMS_DEK_SIZE);
	r = kms_wrap(k, dek, (const char *const *)argv, (size_t)argc, &w, &err);
	if (r < 0) {
		print_error("wrap", r, &err);
		sodium_free(dek);
		return 1;
	}
	dek_sha256(dek, hex);
	sodium_free(dek);
	printf("{\"ok\":true,\"op\":\"wrap\"");
	print_wrapped(&w);
	printf(",\"dek_sha256\":\"%s\"}\n", hex);
	return 0;
}

static int cmd_unwrap(struct kms *k, int argc, char **argv)
{
	struct kms_wrapped nw;
	struct kms_err err = { .msg = "" };
	uint8_t *dek;
	bool was = false;
	char hex[65];
	int r;

	if (argc < 1) {
		fprintf(stderr, "kms-probe: error: unwrap needs a BLOB\n");
		return 2;
	}
	dek = sodium_malloc(KMS_DEK_SIZE);
	if (!dek)
		return 1;
	r = kms_unwrap(k, (const uint8_t *)argv[0], strlen(argv[0]), (const char *const *)argv + 1,
		       (size_t)argc - 1, dek, &nw, &was, &err);
	if (r < 0) {
		print_error("unwrap", r, &err);
		sodium_free(dek);
		return 1;
	}
	dek_sha256(dek, hex);
	sodium_free(dek);
	printf("{\"ok\":true,\"op\":\"unwrap\",\"dek_sha256\":\"%s\",\"rewrapped\":%s", hex, was ? "true" : "false");
	if (was)
		print_wrapped(&nw);
	printf("}\n");
	return 0;
}

static int cmd_state(struct kms *k)
{
	struct kms_err err = { .msg = "" };
	int r, state = -1;

	r = kms_key_state(k, &state, &err);
	if (r < 0) {
		print_error("state", r, &err);
		return 1;
	}
	printf("{\"ok\":true,\"op\":\"state\",\"state\":%d,\"name\":\"%s\"}\n", state, kms_state_name(state));
	return 0;
}

struct rt_job {
	struct kms *k;
	unsigned count;
	long pause_ms;
	unsigned done;
	int r;
	struct kms_err err;
};

static void *rt_thread(void *arg)
{
	struct rt_job *j = arg;
	uint8_t *dek = sodium_malloc(KMS_DEK_SIZE), *back = sodium_malloc(KMS_DEK_SIZE);
	char volume[37], fid[33];
	uint8_t fidb[16];
	const char *aad[2] = { volume, fid };
	struct kms_wrapped w;
	bool was;

	if (!dek || !back) {
		j->r = -ENOMEM;
		goto out;
	}
	util_uuid4(volume);
	for (unsigned i = 0; i < j->count; i++) {
		if (i > 0 && j->pause_ms > 0) {
			struct timespec ts = { .tv_sec = j->pause_ms / 1000, .tv_nsec = (j->pause_ms % 1000) * 1000000L };

			nanosleep(&ts, NULL);
		}
		randombytes_buf(dek, KMS_DEK_SIZE);
		randombytes_buf(fidb, sizeof(fidb));
		util_hex(fidb, sizeof(fidb), fid);
		j->r = kms_wrap(j->k, dek, aad, 2, &w, &j->err);
		if (j->r < 0)
			break;
		j->r = kms_unwrap(j->k, w.blob, w.len, aad, 2, back, NULL, &was, &j->err);
		if (j->r < 0)
			break;
		if (sodium_memcmp(dek, back, KMS_DEK_SIZE) != 0) {
			j->r = -EBADMSG;
			snprintf(j->err.msg, sizeof(j->err.msg), "unwrap returned another DEK than was wrapped");
			break;
		}
		j->done++;
	}
out:
	sodium_free(dek);
	sodium_free(back);
	return NULL;
}

static int cmd_roundtrip(struct kms *k, int argc, char **argv)
{
	uint64_t n = 0, threads = 1, pause = 0;
	struct rt_job *jobs;
	pthread_t *tids;
	struct timespec t0, t1;
	unsigned done = 0;
	int rc = 0;

	if (argc < 1 || util_parse_u64(argv[0], 1, 1000000, &n) < 0 ||
	    (argc > 1 && util_parse_u64(argv[1], 1, 64, &threads) < 0) ||
	    (argc > 2 && util_parse_u64(argv[2], 0, 600000, &pause) < 0)) {
		fprintf(stderr, "kms-probe: error: roundtrip N [THREADS [PAUSE_MS]]\n");
		return 2;
	}
	jobs = calloc(threads, sizeof(*jobs));
	tids = calloc(threads, sizeof(*tids));
	if (!jobs || !tids)
		return 1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (uint64_t i = 0; i < threads; i++) {
		jobs[i].k = k;
		jobs[i].count = (unsigned)(n / threads + (i < n % threads ? 1 : 0));
		jobs[i].pause_ms = (long)pause;
		pthread_create(&tids[i], NULL, rt_thread, &jobs[i]);
	}
	for (uint64_t i = 0; i < threads; i++)
		pthread_join(tids[i], NULL);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	for (uint64_t i = 0; i < threads; i++) {
		done += jobs[i].done;
		if (jobs[i].r < 0 && rc == 0) {
			print_error("roundtrip", jobs[i].r, &jobs[i].err);
			rc = 1;
		}
	}
	if (rc == 0)
		printf("{\"ok\":true,\"op\":\"roundtrip\",\"count\":%u,\"threads\":%u,\"seconds\":%.3f}\n", done,
		       (unsigned)threads, (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	free(jobs);
	free(tids);
	return rc;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: kms-probe --voldesc FILE [--apikey-file FILE] [--ca-file FILE] [--keystore DIR]\n"
		   "                 [--clear-instance] wrap AAD... | unwrap BLOB AAD... | state |\n"
		   "                 roundtrip N [THREADS [PAUSE_MS]]\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "voldesc", required_argument, NULL, 'v' },
		{ "apikey-file", required_argument, NULL, 'a' },
		{ "ca-file", required_argument, NULL, 'c' },
		{ "keystore", required_argument, NULL, 'k' },
		{ "clear-instance", no_argument, NULL, 'I' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *voldesc_path = NULL, *apikey_file = NULL, *ca_file = NULL, *keystore = NULL;
	struct kms_config cfg;
	struct kms_err err = { .msg = "" };
	struct voldesc vol;
	struct kms *k = NULL;
	char perr[256], *text = NULL;
	size_t len = 0;
	bool clear_instance = false;
	int c, r, rc;

	log_init("kms-probe", LOG_LEVEL_INFO);
	while ((c = getopt_long(argc, argv, "+h", opts, NULL)) != -1) {
		switch (c) {
		case 'v': voldesc_path = optarg; break;
		case 'a': apikey_file = optarg; break;
		case 'c': ca_file = optarg; break;
		case 'k': keystore = optarg; break;
		case 'I': clear_instance = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (!voldesc_path || optind >= argc) {
		usage(stderr);
		return 2;
	}
	if (sodium_init() < 0)
		return 1;
	r = util_read_file(AT_FDCWD, voldesc_path, VOLDESC_MAX, &text, &len);
	if (r < 0) {
		fprintf(stderr, "kms-probe: error: volume description '%s': %s\n", voldesc_path, strerror(-r));
		return 2;
	}
	r = voldesc_parse(text, len, &vol, perr, sizeof(perr));
	free(text);
	if (r < 0) {
		fprintf(stderr, "kms-probe: error: volume description '%s': %s\n", voldesc_path, perr);
		return 2;
	}
	/* What init sees when the key is given as a CRN without --instance. */
	if (clear_instance)
		vol.instance[0] = '\0';
	cfg = (struct kms_config){
		.kms = vol.kms, .key = vol.key, .key_id = vol.key_id, .endpoint = vol.endpoint,
		.instance = vol.instance, .iam_endpoint = vol.iam_endpoint,
		.keystore = keystore ? keystore : vol.keystore, .apikey_file = apikey_file, .ca_file = ca_file,
	};
	r = kms_open(&cfg, &k, &err);
	if (r < 0) {
		print_error("open", r, &err);
		return 1;
	}
	if (strcmp(argv[optind], "wrap") == 0) {
		rc = cmd_wrap(k, argc - optind - 1, argv + optind + 1);
	} else if (strcmp(argv[optind], "unwrap") == 0) {
		rc = cmd_unwrap(k, argc - optind - 1, argv + optind + 1);
	} else if (strcmp(argv[optind], "state") == 0) {
		rc = cmd_state(k);
	} else if (strcmp(argv[optind], "roundtrip") == 0) {
		rc = cmd_roundtrip(k, argc - optind - 1, argv + optind + 1);
	} else {
		fprintf(stderr, "kms-probe: error: unknown command '%s'\n", argv[optind]);
		rc = 2;
	}
	kms_free(k);
	fflush(stdout);
	return rc;
}

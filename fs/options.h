/* options.h: the keyfs command line: BACKING MOUNTPOINT [-f] [-d] [-o opt,...], our options and FUSE's */
#ifndef KEYFS_FS_OPTIONS_H
#define KEYFS_FS_OPTIONS_H

#include <stdbool.h>
#include <stdio.h>

#define OPTIONS_FUSE_MAX 4096
/* A shared mount's entry and attribute timeout: how late another host's change may be seen. */
#define OPTIONS_SHARED_TIMEOUT_DEFAULT 1
#define OPTIONS_SHARED_TIMEOUT_MAX 3600

struct keyfs_options {
	const char *backing;            /* as given */
	const char *mountpoint;         /* as given */
	bool foreground;                /* -f, also implied by -d */
	bool debug;                     /* -d */
	bool nonempty;                  /* -o nonempty */
	bool writeback;                 /* -o writeback, the default (-o nowriteback: off) */
	int shared;                     /* -o shared 1, -o noshared 0; -1: as the volume says */
	int shared_timeout;             /* -o shared_timeout=SEC, 0..OPTIONS_SHARED_TIMEOUT_MAX */
	bool help;                      /* --help */
	bool version;                   /* --version */
	char *keystore;                 /* -o keystore=DIR, absolute; malloc'd or NULL */
	char *apikey_file;              /* -o apikey_file=F, absolute; malloc'd or NULL */
	char *ca_file;                  /* -o ca_file=F, absolute; malloc'd or NULL */
	/* The key service's location stated whole (-o kms=...): trusted instead of a record. */
	char *kms;                      /* -o kms=local|keyprotect; malloc'd or NULL */
	char *key;                      /* -o key=NAME|ID|CRN */
	char *endpoint;                 /* -o endpoint=URL */
	char *instance;                 /* -o instance=GUID */
	char *iam_endpoint;             /* -o iam_endpoint=URL */
	int dek_pool;                   /* -o dek_pool=N, 0..DEKPOOL_MAX; -1: the kms's default */
	int prefetch;                   /* -o prefetch=N, 0..PREFETCH_MAX; -1: the kms's default */
	int kms_concurrency;            /* -o kms_concurrency=N, 1..KMS_CONCURRENCY_MAX; -1: the default */
	int poll;                       /* -o poll=SEC, 1..KS_POLL_MAX: seconds between key state reads */
	int grace;                      /* -o grace=SEC, 0..KS_GRACE_MAX: KMS outage tolerated unlocked */
	char fuse[OPTIONS_FUSE_MAX];    /* FUSE mount options passed through, comma-separated */
};

/* Parse argv into ret. Returns 0, or -EINVAL after printing one message (exit KEYFS_EXIT_USAGE). */
int options_parse(int argc, char *argv[], struct keyfs_options *ret);
void options_free(struct keyfs_options *o);
void options_usage(FILE *f);
void options_help(FILE *f);

#endif

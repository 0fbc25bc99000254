/* kms-keyprotect.h: entry point of the IBM Key Protect backend (kms_keyprotect.c), private to keyclient/ */
#ifndef KEYFS_KMS_KEYPROTECT_H
#define KEYFS_KMS_KEYPROTECT_H

#include "kms-backend.h"

/*
 * Reads endpoint, instance, key (id or CRN) and IAM endpoint from cfg, the API key from
 * cfg->apikey_file or $CREDENTIALS_DIRECTORY/apikey. Makes no network call.
 *
 * Test-only environment (never set in production; read once here):
 *   KEYFS_TEST_BACKOFF_SCALE=F   multiply the 1, 2, 4, 8 s retry backoff by F (0 <= F <= 1)
 *   KEYFS_TEST_TIMEOUT_MS=N      per-attempt timeout in ms (100..30000) instead of 30 s
 */
int kms_keyprotect_open(const struct kms_config *cfg, struct kms_backend_open *ret, struct kms_err *err);

#endif

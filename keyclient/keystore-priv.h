/* keystore-priv.h: what the local backend needs from the keystore beyond public facts: key material */
#ifndef KEYFS_KEYSTORE_PRIV_H
#define KEYFS_KEYSTORE_PRIV_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#include "keyfs/keystore.h"

/* Key material of one version. Always in sodium_malloc memory; the caller wipes and frees it. */
struct keystore_material {
	unsigned version;               /* 0 when the wanted version is not in the key file */
	uint8_t key[KEYSTORE_MATERIAL_SIZE];
	struct stat st;                 /* of the file the material came from, taken before reading */
	char path[PATH_MAX];            /* that file */
};

/*
 * Read key name from dir under a shared lock: its public facts into ret_info and, when mat is
 * non-NULL, the material of version want (0: the newest) into mat. Every version's material
 * file is checked either way. A tombstone or a key file without that version succeeds
 * with mat->version = 0: the caller decides from ret_info->state. A material file missing or
 * damaged also succeeds, with ret_info->state destroyed, ret_info->note and err saying why.
 * Returns 0 or -errno with a one-line message in err:
 *   -ENOENT no keystore dir or no key file   -EACCES not readable   -EPERM unsafe owner or mode
 *   -ENOTDIR keystore is not a dir            -EUCLEAN damaged key file
 *   -EPROTONOSUPPORT newer key file format     -EINVAL bad name     -ETIMEDOUT lock not granted
 */
int keystore_load(const char *dir, const char *name, unsigned want, struct keystore_info *ret_info,
		  struct keystore_material *mat, char *err, size_t errlen);

#endif

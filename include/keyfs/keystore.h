/* keystore.h: the local keystore: a 0700 directory of 0600 state and material files, for single machines */
#ifndef KEYFS_KEYSTORE_H
#define KEYFS_KEYSTORE_H

#include <stddef.h>
#include <stdint.h>


#define KEYSTORE_NAME_MAX 64            /* [A-Za-z0-9][A-Za-z0-9._-]{0,63} */
#define KEYSTORE_MATERIAL_SIZE 32

/* Public facts about a key; never its material. */
struct keystore_info {
	char name[KEYSTORE_NAME_MAX + 1];
	char id[37];                    /* uuid, written into file headers */
	int state;                      /* enum kms_key_state */
	unsigned version;               /* newest version number, 1 for a new key; 0 when destroyed */
	char created[32];               /* RFC 3339 UTC */
	char updated[32];
	char path[4096];                /* the key's state file */
	unsigned format;                /* of the state file: 1 (earlier keyfs: material inline) or 2 */
	char note[4096 + 128];          /* non-empty: why a key not destroyed counts as destroyed
					 * (a material file missing or damaged); state says destroyed */
};

/* Default keystore dir: /var/lib/keyfs/keystore for root, else $XDG_DATA_HOME/keyfs/keystore
 * or ~/.local/share/keyfs/keystore. Returns 0 or -ENAMETOOLONG / -ENOENT (no home). */
int keystore_default_dir(char *buf, size_t size);

/* Check a key name. Returns 0 or -EINVAL. */
int keystore_name_valid(const char *name);

/*
 * Files: NAME.key, the state (no secret; rewritten by temp file + rename), and NAME.vN.material,
 * one per version, written once and never rewritten, so each version's material has one copy,
 * which destroy overwrites in place. A material file missing or damaged (zeroed, truncated,
 * garbage) makes the key count as destroyed. A format-1 key file (material inline) is read as
 * before and migrated by its first change. docs/FORMAT.md has the layouts.
 *
 * Errors besides those named per function: -EPERM keystore dir or key file unsafe (group/other
 * writable dir, key file with group/other bits, a symlink, foreign owner), -ENOTDIR keystore is
 * not a directory, -EUCLEAN damaged key file, -EPROTONOSUPPORT key file of a newer format,
 * -ETIMEDOUT the keystore lock stayed busy (another keyfsctl changing it).
 */

/* Create key name with fresh random material (creating dir 0700 when missing).
 * -EEXIST when a key or tombstone of that name exists. */
int keystore_create(const char *dir, const char *name, struct keystore_info *ret);

/* Read a key's public facts. -ENOENT when there is no such key, -EACCES when unreadable. */
int keystore_show(const char *dir, const char *name, struct keystore_info *ret);

/* Suspend (KMS_STATE_SUSPENDED), enable (KMS_STATE_ACTIVE) or deactivate (KMS_STATE_DEACTIVATED)
 * a key; rewrites only the state file. -EKEYREVOKED when destroyed or its material is damaged. */
int keystore_set_state(const char *dir, const char *name, int state);

/* Add a version (a new material file) with fresh random material; older versions stay for
 * unwrapping. -ENOKEY when the key is not active, -EKEYREVOKED when destroyed or damaged,
 * -ENOBUFS at 1024 versions. */
int keystore_rotate(const char *dir, const char *name, struct keystore_info *ret);

/* Overwrite every version's material in place with random bytes, fdatasync, leave a tombstone
 * that says destroyed, remove the material files and sync the dir. Also finishes a key whose
 * material is damaged (an interrupted destroy). -EKEYREVOKED when already destroyed. */
int keystore_destroy(const char *dir, const char *name);

#endif

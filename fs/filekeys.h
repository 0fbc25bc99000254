/* filekeys.h: the keys of one regular file: header read, unwrap and verify, or a new header for an empty file */
#ifndef KEYFS_FS_FILEKEYS_H
#define KEYFS_FS_FILEKEYS_H

#include <stdbool.h>

#include "keyfs/content.h"

#include "fs.h"

/*
 * Fill cf (fd, keys, file id) for inode, loading its keys from the header on first use.
 * fd is a readable backing fd of the inode. cf->keys is NULL when the backing file is still
 * empty (a valid empty file without a header). The caller holds inode->content or is opening
 * the file. Returns 0, or the errno a file operation answers with: -EIO (damaged header, DEK
 * that does not unwrap), -ENOKEY, -EKEYREVOKED, -EKEYEXPIRED, -ENOMEM.
 */
int filekeys_get(struct keyfs *fs, struct kfs_inode *inode, int fd, struct content_file *cf);

/* Like filekeys_get, but an empty backing file first gets a fresh header (new DEK, wrapped by
 * the KMS). fd must be open for reading and writing; the caller holds inode->content exclusively
 * or has just created the file. */
int filekeys_get_or_create(struct keyfs *fs, struct kfs_inode *inode, int fd, struct content_file *cf);

/* The inode has no keys and nobody is loading them: a prefetch would do something. */
bool filekeys_wanted(struct kfs_inode *inode);

/* Load the keys of inode ahead of need, when nobody has or is loading them; quiet (a failure
 * is reported by the open that needs the file). No lock held by the caller, who holds a
 * reference on inode. Returns 0 (also when there was nothing to do) or the load's errno. */
int filekeys_prefetch(struct keyfs *fs, struct kfs_inode *inode);

/* Truncate fd to 0 bytes, header included, forgetting any keys of inode: how a file whose
 * header does not open is emptied for reuse (its next write makes a new header). The caller
 * holds inode->content exclusively. Returns 0 or -errno. */
int filekeys_drop_header(struct keyfs *fs, struct kfs_inode *inode, int fd);

/* Wipe the keys of inode (the mount is locking). What a load in flight brings back is
 * discarded, not installed; a foreground load then loads again, so the caller must first make
 * new loads fail (the lock state). The caller holds inode->content exclusively: nobody is
 * using the keys. */
bool filekeys_forget(struct keyfs *fs, struct kfs_inode *inode);

#endif

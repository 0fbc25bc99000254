/* filekeys.h: the keys of one regular file: header read, unwrap and verify, or a new header for an empty file */
#ifndef KEYFS_FS_FILEKEYS_H
#define KEYFS_FS_FILEKEYS_H

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

#endif

/* progress.h: one self-overwriting progress line on stderr, only when stderr is a terminal (private to cli/) */
#ifndef KEYFS_CLI_PROGRESS_H
#define KEYFS_CLI_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

struct progress {
	bool on;                        /* stderr is a terminal */
	bool shown;                     /* a line is on the screen now */
	bool files_only;                /* set after progress_init: the bytes mean nothing here */
	const char *what;               /* "fsck", "rewrap", "inspect" */
	struct timespec start, last;
};

void progress_init(struct progress *p, const char *what);

/* Show the counts so far, at most ten times a second; path is what is being worked on. */
void progress_update(struct progress *p, uint64_t files, uint64_t bytes, const char *path);

/* Erase the line, before printing a message or at the end. */
void progress_clear(struct progress *p);

/* One line of a command's report on stdout, "what: PATH: message", with the progress line
 * erased first; PATH printed safe for a terminal, "." for the root. */
void progress_report(struct progress *p, const char *what, const char *path, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

#endif

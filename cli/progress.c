/* progress.c: a progress line on stderr for long runs, rate-limited, shown on a terminal only */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "cli.h"
#include "progress.h"

static double since(const struct timespec *a, const struct timespec *b)
{
	return (double)(b->tv_sec - a->tv_sec) + (double)(b->tv_nsec - a->tv_nsec) / 1e9;
}

void progress_init(struct progress *p, const char *what)
{
	memset(p, 0, sizeof(*p));
	p->what = what;
	p->on = isatty(STDERR_FILENO) == 1;
	clock_gettime(CLOCK_MONOTONIC, &p->start);
}

static void human(uint64_t n, char *buf, size_t size)
{
	static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB" };
	double v = (double)n;
	unsigned u = 0;

	while (v >= 1024 && u + 1 < sizeof(units) / sizeof(units[0])) {
		v /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(buf, size, "%" PRIu64 " B", n);
	else
		snprintf(buf, size, "%.1f %s", v, units[u]);
}

void progress_update(struct progress *p, uint64_t files, uint64_t bytes, const char *path)
{
	struct winsize ws;
	struct timespec now;
	char line[512], size[32], rate[32];
	double t;
	int cols = 80, n;

	if (!p->on)
		return;
	clock_gettime(CLOCK_MONOTONIC, &now);
	if (p->shown && since(&p->last, &now) < 0.1)
		return;
	p->last = now;
	t = since(&p->start, &now);
	if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 20)
		cols = ws.ws_col;
	if ((size_t)cols >= sizeof(line))
		cols = (int)sizeof(line) - 1;
	human(bytes, size, sizeof(size));
	human(t > 0.5 ? (uint64_t)((double)bytes / t) : 0, rate, sizeof(rate));
	if (p->files_only)
		n = snprintf(line, sizeof(line), "%s: %" PRIu64 " files: ", p->what, files);
	else
		n = snprintf(line, sizeof(line), "%s: %" PRIu64 " files, %s (%s/s): ", p->what, files, size, rate);
	if (n < 0)
		return;
	if (n < cols - 1) {
		size_t room = (size_t)(cols - 1 - n), plen = strlen(path);

		/* Keep the end of a long path: the file name says more than the top dirs. */
		if (plen > room && room > 3)
			snprintf(line + n, sizeof(line) - (size_t)n, "...%s", path + plen - (room - 3));
		else if (plen <= room)
			snprintf(line + n, sizeof(line) - (size_t)n, "%s", path);
	}
	line[cols - 1] = '\0';
	/* A file name is anyone's bytes: none of them may reach the terminal as a control. */
	for (char *c = line; *c; c++)
		if ((unsigned char)*c < 0x20 || *c == 0x7f)
			*c = '?';
	fprintf(stderr, "\r\033[K%s", line);
	fflush(stderr);
	p->shown = true;
}

void progress_clear(struct progress *p)
{
	if (!p->on || !p->shown)
		return;
	fputs("\r\033[K", stderr);
	fflush(stderr);
	p->shown = false;
}

void progress_report(struct progress *p, const char *what, const char *path, const char *fmt, ...)
{
	va_list ap;

	progress_clear(p);
	printf("%s: ", what);
	cli_fputs_safe(stdout, path[0] ? path : ".");
	fputs(": ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

/* LD_PRELOAD shim for the power-cut test (tests/powercut.py): every fsync, fdatasync and rename
 * under $POWERCUT_DIR, in the agent and its children, SQLite's commits included, is announced to
 * the harness on $POWERCUT_SOCKET before and after it runs; the calling thread waits for the
 * harness's answer each time. Before: the harness cuts the power there (a snapshot of what is
 * durable). After: it learns what became durable. Nothing else is changed.
 *
 *   cc -shared -fPIC -O2 -o powercut_shim.so powercut_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static int under(const char *path) {
    const char *dir = getenv("POWERCUT_DIR");
    size_t n;
    if (!dir || !path) return 0;
    n = strlen(dir);
    return strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == 0);
}

static void fd_path(int fd, char *out, size_t size) {
    char link[64];
    ssize_t n;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, out, size - 1);
    out[n > 0 ? n : 0] = 0;
}

/* One line to the harness, then wait for its one-byte answer. */
static void tell(const char *line) {
    const char *path = getenv("POWERCUT_SOCKET");
    struct sockaddr_un addr;
    size_t left = strlen(line);
    char ack;
    int saved = errno, s;
    if (!path) return;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
    s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s >= 0 && connect(s, (struct sockaddr *)&addr, sizeof addr) == 0) {
        while (left > 0) {
            ssize_t n = send(s, line, left, MSG_NOSIGNAL);
            if (n <= 0) break;
            line += n;
            left -= (size_t)n;
        }
        shutdown(s, SHUT_WR);
        if (recv(s, &ack, 1, 0) < 0) ack = 0;
    }
    if (s >= 0) close(s);
    errno = saved;
}

static int synced(const char *op, int fd, int (*real)(int)) {
    char path[4096], line[4200];
    struct stat st;
    int r;
    fd_path(fd, path, sizeof path);
    if (!under(path) || fstat(fd, &st) != 0) return real(fd);
    snprintf(line, sizeof line, "pre\t%s\t%lld\t%s\n", op, (long long)st.st_size, path);
    tell(line);
    r = real(fd);
    snprintf(line, sizeof line, "post\t%s\t%lld\t%s\n", op, (long long)st.st_size, path);
    tell(line);
    return r;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return synced("fsync", fd, real);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return synced("fdatasync", fd, real);
}

int rename(const char *from, const char *to) {
    static int (*real)(const char *, const char *);
    char line[8300];
    int r;
    if (!real) real = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    if (!under(to)) return real(from, to);
    snprintf(line, sizeof line, "pre\trename\t0\t%s\t%s\n", to, from);
    tell(line);
    r = real(from, to);
    snprintf(line, sizeof line, "post\trename\t0\t%s\t%s\n", to, from);
    tell(line);
    return r;
}

"""Names in a writable host directory that the host runs later: protected by default.

A task given a repository (or a home) as ``filesystem.write`` could plant
code that the *host* executes on its own: the next ``git status``, the next
shell, the next ``cd`` (direnv), the next time an editor, CI system or
coding agent opens the directory.  These names may be read but not written,
at any depth (nested repositories count), whether they exist at start or not;
``filesystem.unprotect`` lifts the protection for named paths.

Each entry: the relative path (matched at any depth, by name, case-folded),
``tree`` (the entry and everything beneath it; else the entry itself), and why.
The list is data: the write gate (``_sys/fusegate.py``) enforces it as given.
"""

from __future__ import annotations

from typing import Final

#: (relative path, tree, reason)
PROTECTED: Final[tuple[tuple[str, bool, str], ...]] = (
    # git
    (".git", False, "the git dir itself: a new or replaced one (or a `.git` file naming "
                    "another gitdir) brings its own hooks and config"),
    (".git/hooks", True, "git runs these on commit, checkout, merge, push ..."),
    (".git/config", False, "core.fsmonitor, core.hooksPath, core.sshCommand, aliases and "
                           "filters run commands on the next git status"),
    (".git/config.worktree", False, "per-worktree git config (same keys as .git/config)"),
    (".git/commondir", False, "points git at another dir whose config and hooks it then uses"),
    (".git/modules", True, "submodules' gitdirs, each with hooks and config"),
    (".git/worktrees", True, "linked worktrees' gitdirs, each with its own config"),
    (".gitmodules", False, "submodule URLs and paths that git submodule update fetches and runs"),
    (".githooks", True, "a conventional core.hooksPath directory"),
    (".husky", True, "husky's hooks directory (core.hooksPath): runs on every commit"),
    (".pre-commit-config.yaml", False, "pre-commit hook definitions: run on the next commit"),
    # shells
    (".bashrc", False, "run by every interactive bash"),
    (".bash_profile", False, "run by login bash"),
    (".bash_login", False, "run by login bash"),
    (".bash_logout", False, "run when login bash exits"),
    (".profile", False, "run by login shells"),
    (".zshrc", False, "run by every interactive zsh"),
    (".zshenv", False, "run by every zsh"),
    (".zprofile", False, "run by login zsh"),
    (".zlogin", False, "run by login zsh"),
    (".inputrc", False, "readline key bindings can run commands"),
    (".config/fish", True, "fish configuration and functions"),
    # direnv and friends
    (".envrc", False, "direnv runs it on cd"),
    (".direnv", True, "direnv's per-directory state and layouts"),
    (".mise.toml", False, "mise runs its hooks and tasks on cd"),
    ("mise.toml", False, "mise runs its hooks and tasks on cd"),
    # editors
    (".vscode", True, "tasks.json runOn folderOpen, settings naming executables"),
    (".idea", True, "JetBrains run configurations and tool paths"),
    (".devcontainer", True, "postCreateCommand and friends run on open"),
    (".exrc", False, "vim/neovim exrc runs on start in that directory"),
    (".nvim.lua", False, "neovim exrc runs on start in that directory"),
    (".nvimrc", False, "neovim exrc runs on start in that directory"),
    # CI
    (".github/workflows", True, "GitHub Actions workflows run with the repository's secrets"),
    (".github/actions", True, "composite actions that workflows run"),
    (".gitlab-ci.yml", False, "GitLab CI pipeline"),
    (".circleci", True, "CircleCI pipeline"),
    (".buildkite", True, "Buildkite pipeline"),
    (".travis.yml", False, "Travis CI pipeline"),
    ("azure-pipelines.yml", False, "Azure Pipelines"),
    # package managers that run configured code on the host's next command
    (".npmrc", False, "script-shell, git and node-options run commands on npm's next use"),
    (".yarnrc", False, "yarn-path runs a file on every yarn command"),
    (".yarnrc.yml", False, "yarnPath runs a file on every yarn command"),
    (".pnpmfile.cjs", False, "pnpm runs it on install"),
    # coding agents
    (".claude", True, "Claude Code settings, hooks and commands"),
    (".mcp.json", False, "MCP servers an agent starts (commands)"),
    (".codex", True, "Codex configuration"),
    (".cursor", True, "Cursor rules, MCP servers and settings"),
    (".gemini", True, "Gemini CLI settings and MCP servers"),
    (".continue", True, "Continue configuration"),
    (".windsurf", True, "Windsurf rules and settings"),
    (".aider.conf.yml", False, "aider configuration (lint/test commands)"),
    # a home directory given as a writable dir
    (".gitconfig", False, "the user's git config: the same keys as .git/config, for every repo"),
    (".config/git", True, "the user's git config and attributes (XDG)"),
    (".ssh", True, "authorized_keys lets someone in; config's ProxyCommand runs commands"),
    (".bash_aliases", False, "sourced by the usual .bashrc"),
    (".local/bin", True, "on the user's PATH: a file there shadows a real command"),
    (".config/autostart", True, "desktop sessions start these"),
    (".config/systemd/user", True, "user units systemd starts"),
    (".aws/config", False, "credential_process runs a command for every AWS call"),
    (".kube/config", False, "exec credential plugins run a command for every kubectl call"),
    (".docker/config.json", False, "credential helpers run for every docker pull and push"),
    (".cargo/config.toml", False, "build.rustc-wrapper and runners run on the next cargo build"),
    (".cargo/config", False, "the same, under its older name"),
    (".hg/hgrc", False, "Mercurial hooks and extensions run on the next hg command"),
    (".zed", True, "Zed settings and tasks"),
)  # fmt: skip

"""Importing ep_ops without a built extension fails once, with the build command in the message."""

import subprocess
import sys
import textwrap


def test_missing_extension_gives_build_instructions():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["ep_ops._C"] = None  # makes `import ep_ops._C` raise ImportError
        try:
            import ep_ops
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("ep_ops imported without its extension")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install --no-build-isolation -e ." in result.stdout

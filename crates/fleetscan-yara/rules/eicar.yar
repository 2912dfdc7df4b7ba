// The EICAR anti-virus test file, as its specification defines it: the 68-byte string at the
// very start of the file, optionally followed by whitespace only (space, tab, LF, CR, Ctrl-Z),
// the whole file at most 128 bytes. The string anywhere else is not the test file.
//
// fleetscan reports the `threat_name` metadata of a matching rule as the threat name (the rule
// identifier when a rule has none).
rule EICAR_Test_File
{
    meta:
        threat_name = "EICAR-Test-File"
        description = "EICAR anti-virus test file (https://www.eicar.org/download-anti-malware-testfile/)"

    strings:
        // The string and its trailing whitespace in one match, so the condition needs no loop:
        // the file is the test file when that match starts at 0 and covers the whole file.
        $eicar = /X5O!P%@AP\[4\\PZX54\(P\^\)7CC\)7\}\$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!\$H\+H\*[ \t\n\r\x1a]{0,60}/

    condition:
        filesize <= 128 and $eicar at 0 and !eicar[1] == filesize
}
